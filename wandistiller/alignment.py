"""Prompt alignment in the toy world, scored from pixels alone.

The background is the palette colour nearest the border's median; the shape's colour the palette colour
nearest the median of the pixels that are clearly not background; the shape how it fills its bounding box
(triangle 1/2, circle pi/4, square 1). A generated image is all-correct when all three match its prompt.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .shapes import PALETTE, parse_caption

ATTRIBUTES = ("background", "colour", "shape")
_PALETTE = np.array(list(PALETTE.values()), dtype=np.float32)
_NAMES = list(PALETTE)
OFF_BACKGROUND = 80.0  # RGB distance from the background colour that counts as "shape"
MIN_SHAPE_PIXELS = 40  # the smallest shape (24 px triangle) covers 288 pixels
# Fill of the bounding box: triangle 0.5, circle 0.785, square 1.0. The square threshold is strict on purpose:
# a square with soft corners or holes is not a square.
CIRCLE_MIN_FILL, SQUARE_MIN_FILL = 0.64, 0.92


def _as_rgb_array(image) -> np.ndarray:
    """(H, W, 3) float RGB in 0..255 from a PIL image, a uint8 array or a [-1, 1] (3, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)


def _nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]


def _shape_pixels(rgb: np.ndarray) -> tuple[str, str | None, np.ndarray | None]:
    """(background, shape colour, mask of the pixels nearer the shape's colour than the background's)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = _nearest_colour(np.median(border, axis=0))
    off = np.linalg.norm(rgb - PALETTE[background], axis=-1) > OFF_BACKGROUND
    if off.sum() < MIN_SHAPE_PIXELS:
        return background, None, None
    colour = _nearest_colour(np.median(rgb[off], axis=0))
    return background, colour, ((rgb - PALETTE[colour]) ** 2).sum(-1) < ((rgb - PALETTE[background]) ** 2).sum(-1)


def describe_image(image) -> dict[str, str | None]:
    """What the picture shows: {'background', 'colour', 'shape'} (None where nothing shape-like is found)."""
    background, colour, near_shape = _shape_pixels(_as_rgb_array(image))
    if near_shape is None:
        return {"background": background, "colour": None, "shape": None}
    # Rows/columns with a stray pixel or two do not stretch the shape's bounding box.
    rows, cols = np.nonzero(near_shape.sum(1) >= 2)[0], np.nonzero(near_shape.sum(0) >= 2)[0]
    if len(rows) == 0 or len(cols) == 0:
        return {"background": background, "colour": colour, "shape": None}
    box = near_shape[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill = box.mean()
    shape = "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle"
    return {"background": background, "colour": colour, "shape": shape}


MIN_MOTION = 4.0  # pixels the shape's centre must travel over a clip to count as moving (shapes move 8-16)


def describe_motion(frames) -> str | None:
    """Which way the shape moves from the first to the last frame: left/right/up/down, 'still', or None when
    either frame shows no shape. `frames`: the clip's frames, each as `describe_image` takes them."""
    centres = []
    for frame in (frames[0], frames[-1]):
        _, _, mask = _shape_pixels(_as_rgb_array(frame))
        if mask is None or not mask.any():
            return None
        ys, xs = np.nonzero(mask)
        centres.append(np.array([xs.mean(), ys.mean()]))
    dx, dy = centres[1] - centres[0]
    if max(abs(dx), abs(dy)) < MIN_MOTION:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def score_image(image, prompt: str) -> dict[str, bool]:
    """Per attribute, whether the picture shows what the prompt asks for; 'all' when every one does."""
    wanted = parse_caption(prompt)
    seen = describe_image(image)
    scores = {attr: seen[attr] == getattr(wanted, attr) for attr in ATTRIBUTES}
    scores["all"] = all(scores.values())
    return scores


@dataclasses.dataclass
class Alignment:
    """Per-attribute accuracy and the all-correct rate over a set of (image, prompt) pairs."""

    background: float
    colour: float
    shape: float
    all_correct: float
    count: int
    per_image: list[dict[str, bool]]

    def as_row(self) -> dict[str, float]:
        return {"background": self.background, "colour": self.colour, "shape": self.shape,
                "all-correct": self.all_correct}


def alignment(images, prompts: list[str]) -> Alignment:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: pass one prompt per image")
    if not prompts:
        raise ValueError("no images to score: pass at least one (image, prompt) pair")
    scores = [score_image(image, prompt) for image, prompt in zip(images, prompts)]
    rate = {key: float(np.mean([s[key] for s in scores])) for key in (*ATTRIBUTES, "all")}
    return Alignment(rate["background"], rate["colour"], rate["shape"], rate["all"], len(scores), scores)
