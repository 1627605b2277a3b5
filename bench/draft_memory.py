"""Peak memory and time of one DRaFT step against K: `bench/step.py --method draft`, kept under its old name.

The rows are measured by bench/step.py's DRaFT path (bench/step_online.py: fastpref's OnlineTrainer and
DRaFTMethod on the bench's architectures, each (arch, K, checkpointing) row in a fresh process); this script only
forwards its arguments there, so there is one piece of code for the job. Every bench/step.py option applies
(--arch, --k, --both, --no-checkpointing, --kl-coeff, --images, --num-steps, --width-scale, --resolution, --device,
--out, --tag).

    python bench/draft_memory.py --arch toy-sd --k 1 5 10 --both --images 4     # CPU, the toy shapes
    python bench/draft_memory.py --arch sd15 sdxl --device cuda --k 1 2 5 10 50 --both --out /tmp/draft

Writes <--out, default bench/results>/step-online-<tag>.csv and .md. The committed bench/results/draft-memory-*
files are the earlier script's rows (DRaFT+ kl_coeff 0.1 with the toy quality reward).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    import step

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--method" in argv:
        raise SystemExit("bench/draft_memory.py: --method is always draft here (use bench/step.py for the others)")
    step.run(step.parse_args(["--method", "draft", *argv]))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
