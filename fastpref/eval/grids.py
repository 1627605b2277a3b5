"""Labeled PNG grids for comparing models: one row per model, one column per (prompt, seed).

Every row shows the same prompts and seeds, so a column compares models on identical inputs.
Small images (the toy world's 32x32) are upscaled with nearest-neighbour so pixels stay visible;
an optional pass/fail frame (green/red) shows what the verifier decided for each image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fastpref.utils.imports import require

PASS_COLOR = (40, 170, 70)
FAIL_COLOR = (210, 50, 50)
PAPER = (255, 255, 255)
INK = (20, 20, 20)


def _font(size: int):
    image_font = require("PIL.ImageFont", "PNG grids")
    try:
        return image_font.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return image_font.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a single over-long word gets its own line)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}".strip()
            if current and _text_size(draw, candidate, font)[0] > width:
                lines.append(current)
                current = word
            else:
                current = candidate
        lines.append(current)
    return lines or [""]


def make_grid(
    rows: Sequence[tuple[str, np.ndarray]],
    column_labels: Sequence[str],
    passed: Sequence[Sequence[bool]] | None = None,
    scale: int = 4,
    font_size: int = 11,
    gap: int = 6,
    title: str | None = None,
):
    """A PIL image: rows of (label, uint8 (N, H, W, 3) images), N = len(column_labels) in every row.

    passed[r][c] (optional) frames image c of row r in green (True) or red (False)."""
    pil_image = require("PIL.Image", "PNG grids")
    pil_draw = require("PIL.ImageDraw", "PNG grids")
    if not rows:
        raise ValueError("make_grid: rows is empty")
    columns = len(column_labels)
    height, width = None, None
    for label, images in rows:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"make_grid: row {label!r} must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != columns:
            raise ValueError(f"make_grid: row {label!r} has {len(images)} images for {columns} column labels")
        if height is None:
            height, width = images.shape[1:3]
        elif images.shape[1:3] != (height, width):
            raise ValueError(f"make_grid: row {label!r} has {images.shape[1:3]} images, others {(height, width)}")
    if passed is not None and (len(passed) != len(rows) or any(len(p) != columns for p in passed)):
        raise ValueError("make_grid: passed must have one flag per image (rows x columns)")

    font = _font(font_size)
    scratch = pil_draw.Draw(pil_image.new("RGB", (1, 1)))
    line_height = _text_size(scratch, "Ag", font)[1] + 3
    frame = max(2, scale // 2) if passed is not None else 0
    cell_w, cell_h = width * scale + 2 * frame, height * scale + 2 * frame
    column_lines = [_wrap(scratch, label, font, cell_w) for label in column_labels]
    header_h = line_height * max(len(lines) for lines in column_lines) + gap
    row_label_w = max(min(_text_size(scratch, label, font)[0], 240) for label, _ in rows) + 2 * gap
    row_lines = [_wrap(scratch, label, font, row_label_w - 2 * gap) for label, _ in rows]
    title_h = line_height + gap if title else 0

    canvas_w = row_label_w + columns * (cell_w + gap) + gap
    canvas_h = title_h + header_h + len(rows) * (cell_h + gap) + gap
    canvas = pil_image.new("RGB", (canvas_w, canvas_h), PAPER)
    draw = pil_draw.Draw(canvas)
    if title:
        draw.text((gap, gap // 2), title, fill=INK, font=font)
    for c, lines in enumerate(column_lines):
        x = row_label_w + c * (cell_w + gap)
        for i, line in enumerate(lines):
            draw.text((x, title_h + i * line_height), line, fill=INK, font=font)
    for r, (label, images) in enumerate(rows):
        y = title_h + header_h + r * (cell_h + gap)
        for i, line in enumerate(row_lines[r]):
            draw.text((gap, y + i * line_height), line, fill=INK, font=font)
        for c, image in enumerate(np.asarray(images)):
            x = row_label_w + c * (cell_w + gap)
            if passed is not None:
                draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=PASS_COLOR if passed[r][c] else FAIL_COLOR)
            big = pil_image.fromarray(image).resize((width * scale, height * scale), pil_image.NEAREST)
            canvas.paste(big, (x + frame, y + frame))
    return canvas


def fit_cells(images: np.ndarray, cell_size: int) -> tuple[np.ndarray, int]:
    """(images, scale) for make_grid so that every cell is about `cell_size` pixels on its longer side: small
    images keep their pixels and get an integer nearest-neighbour `scale`; larger ones are downscaled (Lanczos)."""
    images = np.asarray(images)
    height, width = images.shape[1:3]
    longest = max(height, width)
    if longest <= cell_size:
        return images, max(1, cell_size // longest)
    pil_image = require("PIL.Image", "PNG grids")
    size = (max(1, round(width * cell_size / longest)), max(1, round(height * cell_size / longest)))
    resized = [np.asarray(pil_image.fromarray(image).resize(size, pil_image.LANCZOS)) for image in images]
    return np.stack(resized), 1


def save_grid(path: str | Path, *args, **kwargs) -> Path:
    """make_grid(...) written to `path` as PNG, atomically (temp file + rename; parent folders created)."""
    from fastpref.utils.atomic import atomic_file

    path = Path(path)
    image = make_grid(*args, **kwargs)
    with atomic_file(path) as handle:
        image.save(handle, format="PNG")
    return path
