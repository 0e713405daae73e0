"""The toy world: one solid shape of one colour moving on a plain background, with a caption that says so.

Images and 5-frame clips are rendered on the fly from a seed, so the ground truth of every picture is known
and a generated image can be scored from its pixels (`wandistiller.alignment`). A fixed set of
(shape, colour, background) combinations never appears in training: those prompts measure whether a model
composes what it learned rather than remembering pictures.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re

import torch

SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (230, 210, 40), "white": (240, 240, 240), "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
MOTIONS = ("left", "right", "up", "down", "still")
SIZE_RANGE = (24, 40)  # pixels; smaller shapes cover 2-3 latent pixels and a small VAE loses them
SPEED_RANGE = (2, 4)  # pixels per frame
IMAGE_SIZE = 64
NUM_FRAMES = 5  # Wan's VAE: 1 + 4k frames -> 1 + k latent frames
VOCABULARY = ("a", "moving", "on", "background", *SHAPES, *COLOURS, *MOTIONS[:-1])
_CAPTION = re.compile(
    rf"^a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})(?: moving ({'|'.join(MOTIONS[:-1])}))? "
    rf"on an? ({'|'.join(COLOURS)}) background$")


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one picture shows: the ground truth a caption states and a scorer checks."""

    shape: str
    colour: str
    background: str
    motion: str = "still"
    size: int = 32
    x: float = 32.0  # centre of the shape in the first frame, pixels
    y: float = 32.0
    speed: int = 3

    @property
    def caption(self) -> str:
        moving = "" if self.motion == "still" else f" moving {self.motion}"
        return f"a {self.colour} {self.shape}{moving} on a {self.background} background"

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.background)


def is_caption(text: str) -> bool:
    """Whether `text` is a toy-world caption (`parse_caption` reads it)."""
    return _CAPTION.match(text.strip().lower()) is not None


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes (position and size are not part of a caption)."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"{caption!r} is not a toy-world caption: write e.g. 'a red circle on a blue background'")
    colour, shape, motion, background = match.groups()
    return Scene(shape, colour, background, motion or "still")


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with the shape's colour differing from the background's."""
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b]


def held_out_combinations(count: int = 24, seed: int = 0) -> list[tuple[str, str, str]]:
    """Combinations never shown in training.

    At most one shape per (colour, background) pair is held out, so every pair, every shape and every colour
    in every role is still seen in training: a held-out prompt asks for a new *combination*, not a new word.
    """
    pairs = [(c, b) for c, b in itertools.product(COLOURS, COLOURS) if c != b]
    random.Random(seed).shuffle(pairs)
    if count > len(pairs):
        raise ValueError(f"at most {len(pairs)} combinations can be held out, not {count}")
    return sorted((SHAPES[i % len(SHAPES)], c, b) for i, (c, b) in enumerate(pairs[:count]))


def training_combinations(held_out: list[tuple[str, str, str]] | None = None) -> list[tuple[str, str, str]]:
    held_out = set(held_out_combinations() if held_out is None else held_out)
    return [combo for combo in all_combinations() if combo not in held_out]


def held_out_prompts(count: int = 24) -> list[str]:
    """Still captions of the held-out combinations: the evaluation prompts."""
    return [Scene(*combo).caption for combo in held_out_combinations(count)]


def random_scene(rng: random.Random, combinations: list[tuple[str, str, str]], still: bool = False) -> Scene:
    """A scene whose shape stays fully inside the frame for all frames."""
    shape, colour, background = rng.choice(combinations)
    motion = "still" if still else rng.choice(MOTIONS)
    size, speed = rng.randint(*SIZE_RANGE), rng.randint(*SPEED_RANGE)
    travel = 0 if motion == "still" else speed * (NUM_FRAMES - 1)
    half = size / 2
    # Leave room ahead of the motion so the last frame is still inside the picture.
    lo_x, hi_x = half + (travel if motion == "left" else 0), IMAGE_SIZE - half - (travel if motion == "right" else 0)
    lo_y, hi_y = half + (travel if motion == "up" else 0), IMAGE_SIZE - half - (travel if motion == "down" else 0)
    return Scene(shape, colour, background, motion, size, rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y), speed)


_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


def shape_mask(shape: str, size: int, x: float, y: float, resolution: int = IMAGE_SIZE) -> torch.Tensor:
    """A (resolution, resolution) boolean mask of the shape centred at (x, y) (pixel centres at i + 0.5)."""
    coords = torch.arange(resolution, dtype=torch.float32) + 0.5
    dy, dx = (coords[:, None] - y), (coords[None, :] - x)
    half = size / 2
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (dx.abs() <= half) & (dy.abs() <= half)
    if shape == "triangle":  # apex up, base at the bottom: |dx| shrinks linearly towards the apex
        inside_rows = dy.abs() <= half
        return inside_rows & (dx.abs() <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")


def render(scene: Scene, num_frames: int = 1) -> torch.Tensor:
    """The scene as (3, num_frames, H, W) floats in [-1, 1] (the range Wan's VAE takes)."""
    step_x, step_y = _STEP[scene.motion]
    frames = []
    for f in range(num_frames):
        mask = shape_mask(scene.shape, scene.size, scene.x + step_x * scene.speed * f,
                          scene.y + step_y * scene.speed * f)
        frame = torch.tensor(PALETTE[scene.background], dtype=torch.float32)[:, None, None].expand(3, *mask.shape)
        frame = torch.where(mask, torch.tensor(PALETTE[scene.colour], dtype=torch.float32)[:, None, None], frame)
        frames.append(frame)
    return torch.stack(frames, dim=1) / 127.5 - 1.0


def sample_batch(rng: random.Random, count: int, num_frames: int = 1, combinations=None) -> tuple[torch.Tensor, list[str]]:
    """`count` random training scenes rendered as (count, 3, num_frames, H, W) with their captions."""
    combinations = training_combinations() if combinations is None else combinations
    scenes = [random_scene(rng, combinations, still=num_frames == 1 and rng.random() < 0.5) for _ in range(count)]
    return torch.stack([render(s, num_frames) for s in scenes]), [s.caption for s in scenes]
