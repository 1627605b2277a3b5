"""`python -m tests.mutations`: see mutation_runner.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutation_runner import main  # noqa: E402

raise SystemExit(main())
