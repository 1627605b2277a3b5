"""Diversity of a model's samples: mean pairwise distance between the M images of the same prompt.

    from fastpref.eval import diversity
    diversity.group_diversity(images, prompts, diversity.pixel_distance)            # any distance
    diversity.toy_diversity(images, prompts)        # {"pixel": ..., "shapeclip": ...} (toy world)
    diversity.lpips_diversity(images, prompts)      # real images: LPIPS through the `lpips` package

images: float (N, 3, H, W) in [0, 1] or uint8 (N, H, W, 3) (fastpref.rewards.to_pixels' forms);
`groups`: one key per image (its prompt, or (prompt, anything)); images with the same key form a group.
Per group with m >= 2 images the mean over its m(m-1)/2 pairs, then the unweighted mean over groups (each
prompt counts once, however many seeds it has). Groups of one image carry no diversity and are left out.

Distances:
- pixel: root mean squared difference of the two images in [0, 1] (0 = identical, 1 = black vs white);
- shapeclip: 1 - cosine of the toy ShapeCLIP image embeddings (the feature-space distance of the toy world, a
  stand-in for LPIPS's learned features);
- lpips: LPIPS (Zhang et al. 2018) from the `lpips` package (the reference implementation; AlexNet backbone by
  default as its authors recommend for a forward metric). Its calibrated linear heads ship inside the package; its
  backbone comes from torchvision's pretrained weights, which need a download (or a torch hub cache).
  `random_backbone=True` uses random backbone weights: for tests only, the numbers mean nothing.

DRaFT+'s claim (its KL term keeps diversity at a matched reward) is measured with these on held-out prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

from fastpref.rewards.base import ImageBatch, to_pixels
from fastpref.utils.stats import sample_std

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (n, 3, H, W) x2 -> (n,)


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) root mean squared difference of image pairs in [0, 1]."""
    return (a.float() - b.float()).square().flatten(1).mean(dim=1).sqrt()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) 1 - cosine similarity of feature vectors (n, D)."""
    return 1.0 - F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)


def group_rows(groups: Sequence[Hashable]) -> list[list[int]]:
    """Row indices of each group, groups in order of first appearance."""
    rows: OrderedDict[Hashable, list[int]] = OrderedDict()
    for index, key in enumerate(groups):
        rows.setdefault(key, []).append(index)
    return list(rows.values())


def group_diversity(
    values: torch.Tensor,
    groups: Sequence[Hashable],
    distance: Distance = pixel_distance,
    batch_size: int = 256,
) -> dict[str, float]:
    """{"mean": mean over groups of the mean pairwise distance, "groups": groups with >= 2 members,
    "pairs": pairs measured, "per_group": each such group's mean pairwise distance, in order of first appearance}.
    values: (N, ...) images or features, one per entry of `groups`."""
    if len(values) != len(groups):
        raise ValueError(f"diversity: {len(values)} images but {len(groups)} group keys")
    firsts, seconds, owners = [], [], []
    members = [rows for rows in group_rows(groups) if len(rows) >= 2]
    for owner, rows in enumerate(members):
        pairs = torch.combinations(torch.tensor(rows), r=2)
        firsts.append(pairs[:, 0])
        seconds.append(pairs[:, 1])
        owners.append(torch.full((len(pairs),), owner))
    if not members:
        return {"mean": float("nan"), "groups": 0, "pairs": 0, "per_group": []}
    first, second, owner = torch.cat(firsts), torch.cat(seconds), torch.cat(owners)
    distances = []
    for start in range(0, len(first), batch_size):
        i, j = first[start : start + batch_size], second[start : start + batch_size]
        distances.append(distance(values[i], values[j]).detach().double().reshape(-1).cpu())
    distances = torch.cat(distances)
    per_group = torch.zeros(len(members), dtype=torch.float64).index_add_(0, owner, distances)
    per_group /= torch.bincount(owner, minlength=len(members)).double()
    return {"mean": float(per_group.mean()), "groups": len(members), "pairs": int(len(first)),
            "per_group": per_group.tolist()}


def _pixels(images: ImageBatch) -> torch.Tensor:
    return to_pixels(images, "diversity images").detach()


def shapeclip_embeddings(pixels: torch.Tensor, model=None, batch_size: int = 256) -> torch.Tensor:
    """(N, D) unit ShapeCLIP image embeddings (the shipped model unless `model` is given)."""
    from fastpref.toy import shapeclip

    model = model if model is not None else shapeclip.load_shipped()
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model.encode_images(pixels[i : i + batch_size].to(device)).cpu()
                          for i in range(0, len(pixels), batch_size)])


def toy_diversity(images: ImageBatch, groups: Sequence[Hashable], shapeclip_model=None) -> dict[str, Any]:
    """Toy world: {"pixel": mean pairwise RMS pixel distance, "shapeclip": mean pairwise 1 - cosine of ShapeCLIP
    image embeddings, "groups", "pairs"}."""
    pixels = _pixels(images)
    pixel = group_diversity(pixels, groups, pixel_distance)
    feature = group_diversity(shapeclip_embeddings(pixels, shapeclip_model), groups, cosine_distance)
    return {"pixel": pixel["mean"], "shapeclip": feature["mean"], "groups": pixel["groups"], "pairs": pixel["pairs"]}


class LPIPSDistance:
    """LPIPS through the `lpips` package: (n, 3, H, W) pairs in [0, 1] -> (n,) distances."""

    def __init__(self, net: str = "alex", random_backbone: bool = False, device: str | torch.device = "cpu"):
        try:
            import lpips
        except ImportError as err:
            raise ImportError(
                f"the LPIPS diversity needs the `lpips` package and a torchvision that imports ({err}); "
                "pip install lpips (torchvision must match torch: on CPU-only torch use the CPU torchvision wheel)"
            ) from err
        try:
            self.model = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False).to(device).eval()
        except OSError as err:  # e.g. offline: torchvision cannot download the backbone's weights
            raise OSError(
                f"LPIPS: the {net} backbone's pretrained weights could not be loaded ({err}); put them in the torch "
                "hub cache (TORCH_HOME), or pass random_backbone=True for a test (its distances mean nothing)"
            ) from err
        self.model.requires_grad_(False)
        self.device = device

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(a.float().to(self.device), b.float().to(self.device), normalize=True)  # [0,1] -> [-1,1]
        return out.reshape(-1)


def lpips_diversity(images: ImageBatch, groups: Sequence[Hashable], net: str = "alex", random_backbone: bool = False,
                    device: str | torch.device = "cpu", batch_size: int = 32) -> dict[str, Any]:
    """Real images: {"lpips": mean pairwise LPIPS, "groups", "pairs"}."""
    result = group_diversity(_pixels(images), groups, LPIPSDistance(net, random_backbone, device), batch_size)
    return {"lpips": result["mean"], "groups": result["groups"], "pairs": result["pairs"]}


def eval_extras(result, shapeclip_model=None, per_image: bool = False) -> dict[str, Any]:
    """Beside a MiniGenEval result (fastpref.eval.minigeneval): the diversity over each prompt's seeds and the toy
    rewards of the same images: {"diversity": {"pixel", "shapeclip", "groups", "pairs"},
    "reward": {"shapeclip", "shapeclip_contrastive", "quality"}} (means over the images; shapeclip_contrastive is
    ShapeCLIP's probability of the caption against its one-attribute variants, DRaFT's sharper reward); with
    per_image also "reward_per_image": each reward of every image, in result.samples' order (what a study's claim on
    a reward pairs and folds as MiniGenEval's pass / fail: fastpref.eval.verdicts)."""
    if result.images is None:
        raise ValueError("diversity: the MiniGenEval result kept no images (evaluate(..., keep_images=True))")
    from fastpref.rewards.toy import QualityReward, ShapeCLIPReward
    from fastpref.toy import shapeclip

    world_name = result.settings.get("world", "v1")  # the evaluated prompts' world picks ShapeCLIP and the palette
    model = shapeclip_model if shapeclip_model is not None else shapeclip.load_shipped(world_name=world_name)
    captions = [sample.caption for sample in result.samples]
    pixels = _pixels(result.images)
    with torch.no_grad():
        scores = {
            "shapeclip": ShapeCLIPReward(model, world=world_name)(pixels, captions, batch_size=256),
            "shapeclip_contrastive": ShapeCLIPReward(model, world=world_name, contrastive=True)(
                pixels, captions, batch_size=256),
            "quality": QualityReward(world=world_name)(pixels, captions, batch_size=256),
        }
    extras = {"diversity": toy_diversity(pixels, captions, model),
              "reward": {name: float(values.mean()) for name, values in scores.items()}}
    if per_image:
        extras["reward_per_image"] = {name: [float(v) for v in values] for name, values in scores.items()}
    return extras


def describe(extras: dict[str, Any]) -> str:
    d, r = extras["diversity"], extras["reward"]
    return (f"diversity over seeds: pixel RMS {d['pixel']:.4f}, ShapeCLIP 1-cos {d['shapeclip']:.4f} "
            f"({d['groups']} prompts, {d['pairs']} pairs); reward: ShapeCLIP {r['shapeclip']:.4f}, "
            + (f"ShapeCLIP contrastive {r['shapeclip_contrastive']:.4f}, " if "shapeclip_contrastive" in r else "")
            + f"quality {r['quality']:.4f}")


# -- beside MiniGenEval in run and study reports ------------------------------------------------------------------

# a model whose diversity falls below (1 - COLLAPSE_TOLERANCE) x the base's is flagged as collapsing (the online
# issues' "no collapse" bar: diversity within 20% of the base's)
COLLAPSE_TOLERANCE = 0.2
EXTRAS_COLUMNS = (("reward", "shapeclip", "ShapeCLIP"), ("reward", "shapeclip_contrastive", "ShapeCLIP contrastive"),
                  ("reward", "quality", "quality"), ("diversity", "shapeclip", "diversity ShapeCLIP 1-cos"),
                  ("diversity", "pixel", "diversity pixel RMS"))


def summarize_extras(per_model: dict[str, Sequence[dict[str, Any]]], base: str = "base",
                     tolerance: float = COLLAPSE_TOLERANCE) -> dict[str, dict[str, Any]]:
    """name -> the eval_extras of each of its models (one per training seed; the base: one) -> per name the mean and
    std (ddof 1; 0 for one model) of every reward and diversity, each mean diversity over the base's, and whether
    every diversity stays within `tolerance` of the base's (`collapse` false) -- read from the means over seeds."""
    import numpy as np

    if base not in per_model:
        raise KeyError(f"diversity summary: no {base!r} among {sorted(per_model)}")
    out: dict[str, dict[str, Any]] = {}
    for name, extras in per_model.items():
        if not extras:
            raise ValueError(f"diversity summary: {name!r} has no evaluated model")
        row: dict[str, Any] = {"seeds": len(extras)}
        for section, key, _ in EXTRAS_COLUMNS:
            values = np.array([e[section][key] for e in extras if key in e[section]], dtype=float)
            if len(values) == len(extras):
                row[f"{section}_{key}"] = float(values.mean())
                row[f"{section}_{key}_std"] = sample_std(values)
        out[name] = row
    for row in out.values():
        ratios = {key: row[f"diversity_{key}"] / out[base][f"diversity_{key}"] for _, key, _ in EXTRAS_COLUMNS[3:]
                  if f"diversity_{key}" in row and out[base].get(f"diversity_{key}", 0) > 0}
        row["diversity_vs_base"] = ratios
        row["collapse"] = any(r < 1 - tolerance for r in ratios.values())
    return out


def summarize_complete_extras(per_model: dict[str, Sequence[dict[str, Any] | None]], base: str = "base"
                              ) -> dict[str, dict[str, Any]] | None:
    """summarize_extras where the base and every model carry rewards and diversity; None where any lacks them (an
    evaluation stored before they were measured): run and study reports then leave the table out."""
    if base not in per_model or not all(extras and all(e and "reward" in e and "diversity" in e for e in extras)
                                        for extras in per_model.values()):
        return None
    return summarize_extras(per_model, base)


def extras_lines(summary: dict[str, dict[str, Any]], tolerance: float = COLLAPSE_TOLERANCE) -> list[str]:
    """Markdown: the rewards and diversity of the very images MiniGenEval scored, per model (mean ± std over its
    training seeds where it has several), each diversity as a share of the base's, and the collapse verdict."""
    columns = [c for c in EXTRAS_COLUMNS if all(f"{c[0]}_{c[1]}" in row for row in summary.values())]
    several = any(row["seeds"] > 1 for row in summary.values())

    def cell(row, section, key):
        mean, std = row[f"{section}_{key}"], row[f"{section}_{key}_std"]
        text = f"{mean:.4f}" + (f" ± {std:.4f}" if several else "")
        ratio = row["diversity_vs_base"].get(key) if section == "diversity" else None
        return text + (f" ({100 * ratio:.0f}%)" if ratio is not None else "")

    lines = ["## Rewards and diversity of the evaluated images", "",
             "The images MiniGenEval scored: mean rewards, and the diversity over each prompt's seeds (prompts weighted "
             "equally) with its share of the base's" + (", mean ± std over the training seeds" if several else "")
             + f". A model whose diversity falls below {100 * (1 - tolerance):.0f}% of the base's is flagged as "
             "collapsing.", "",
             "| model | " + " | ".join(label for _, _, label in columns) + " | collapse |",
             "|---|" + "---|" * (len(columns) + 1)]
    for name, row in summary.items():
        verdict = "yes" if row["collapse"] else "no"
        lines.append(f"| {name} | " + " | ".join(cell(row, s, k) for s, k, _ in columns) + f" | {verdict} |")
    return lines + [""]
