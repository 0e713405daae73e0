"""Notebook and headless display: live loss curves, sample grids and small analysis plots.

Figures are `matplotlib.figure.Figure` objects made without pyplot, so nothing here selects a backend or
opens a window, and the same code runs in JupyterLab, under papermill and in a plain script. Inside IPython a
live figure occupies exactly one output, replaced in place through a display id: a notebook executed
headless stores the final figure once, not one copy per redraw. Outside IPython nothing is displayed; call
``save`` to keep a figure.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

ImageLike = Image.Image | np.ndarray


# --- display plumbing -------------------------------------------------------------------------------------


def _ipython_shell():
    """The running IPython shell, or None in a plain Python process (or where IPython is not installed)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A pyplot-free figure that shows as an image when it is a notebook cell's result."""
    shell = _ipython_shell()
    if shell is not None:
        # Without pyplot the inline backend never registers a PNG formatter, and a returned Figure would show
        # as "<Figure size ...>" text; register the same formatter it would.
        shell.display_formatter.formatters["image/png"].for_type(Figure, _figure_png)
    return Figure(figsize=figsize, layout="constrained")


class _DisplaySlot:
    """One notebook output, created by the first `show` and replaced in place by later ones."""

    def __init__(self):
        self._handle = None

    def show(self, fig: Figure) -> None:
        if _ipython_shell() is None:
            return
        from IPython.display import Image as PngImage
        from IPython.display import display

        # A PNG rather than the Figure itself: it displays the same whatever matplotlib backend is active.
        png = PngImage(data=_figure_png(fig))
        if self._handle is None:
            self._handle = display(png, display_id=True)
        else:
            self._handle.update(png)


# --- live loss plot ---------------------------------------------------------------------------------------


def _as_float(value) -> float | None:
    """A metric value as a float, or None when it is not a single number (strings, lists, flags)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl file, one JSON object per line.

    A torn last line is skipped: the file may be read while a run is still appending to it.
    """
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


class LiveLossPlot:
    """Loss curves that grow while training runs: one line per loss part, log-scale y, lr on a twin axis.

    Use ``update`` as a training callback. Inside IPython the figure is shown once, at the first update, and
    then redrawn in place every ``redraw_every`` updates; elsewhere updates only record, and ``save`` draws.
    Create the plot in the cell that trains, so the output lands under that cell.

    Parameters:
        keys: metric names to plot; None plots every numeric metric except ``step`` and ``lr``.
        redraw_every: updates between redraws (drawing costs tens of milliseconds).
        log_y: log-scale loss axis. A part that is zero throughout (e.g. feature KD switched off) is left out,
            since a log axis cannot draw it.
    """

    def __init__(
        self,
        keys: Sequence[str] | None = None,
        redraw_every: int = 10,
        log_y: bool = True,
        title: str = "Distillation loss",
        figsize: tuple[float, float] = (7.0, 3.5),
    ):
        self.keys = list(keys) if keys is not None else None
        self.redraw_every = redraw_every
        self.log_y = log_y
        self.title = title
        self.figure = new_figure(figsize)
        self.records: list[dict[str, float]] = []
        self._seen_keys: dict[str, None] = {}  # insertion-ordered set: legend order = first appearance
        self._pending = 0
        self._slot = _DisplaySlot()

    @classmethod
    def from_metrics_file(cls, path: str | Path, **kwargs) -> LiveLossPlot:
        """Plot a metrics.jsonl written by a (possibly still running) job; shown once inside IPython."""
        plot = cls(**kwargs)
        for record in read_metrics(path):
            plot._record(record["step"], record)
        plot.show()
        return plot

    def update(self, step: int, metrics: Mapping[str, object]) -> None:
        """Record the metrics of ``step`` and, inside IPython, redraw when due."""
        self._record(step, metrics)
        self._pending += 1
        due = self._pending >= self.redraw_every or len(self.records) == 1
        if due and _ipython_shell() is not None:
            self.show()

    def show(self) -> None:
        """Redraw now and put the figure in its notebook output (no-op display outside IPython)."""
        self._draw()
        self._slot.show(self.figure)
        self._pending = 0

    def save(self, path: str | Path) -> None:
        """Write the current curves to a PNG file."""
        self._draw()
        self.figure.savefig(path, format="png")

    def close(self) -> None:
        """Show the updates recorded since the last redraw, so the notebook keeps the final curves."""
        if self._pending:
            self.show()

    def _record(self, step: int, metrics: Mapping[str, object]) -> None:
        # A resumed run logs again from its checkpoint's step: its records replace the ones after it.
        if self.records and step <= self.records[-1]["step"]:
            self.records = [r for r in self.records if r["step"] < step]
        record = {"step": step}
        for key, value in metrics.items():
            number = _as_float(value)
            if key != "step" and number is not None:
                record[key] = number
                self._seen_keys.setdefault(key)
        self.records.append(record)

    def _series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.records if key in r]
        return [s for s, _ in points], [v for _, v in points]

    def _draw(self) -> None:
        self.figure.clear()
        ax = self.figure.add_subplot()
        keys = self.keys if self.keys is not None else [k for k in self._seen_keys if k != "lr"]
        for key in keys:
            steps, values = self._series(key)
            if self.log_y and not any(v > 0 for v in values):
                continue
            ax.plot(steps, values, label=key)
        if self.log_y and ax.lines:
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="loss", title=self.title)
        handles, labels = ax.get_legend_handles_labels()
        lr_steps, lr_values = self._series("lr")
        if lr_steps:
            ax_lr = ax.twinx()
            ax_lr.plot(lr_steps, lr_values, color="0.5", linestyle="--", label="lr")
            ax_lr.set_ylabel("learning rate")
            lr_handles, lr_labels = ax_lr.get_legend_handles_labels()
            handles, labels = handles + lr_handles, labels + lr_labels
        if handles:
            ax.legend(handles, labels, loc="upper right", fontsize="small")


# --- images -----------------------------------------------------------------------------------------------


def _to_pil(image: ImageLike) -> Image.Image:
    """PIL image from a PIL image or an HxWx3 array (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def image_grid(images: Sequence[ImageLike], nrow: int) -> Image.Image:
    """Tile equally sized images, ``nrow`` per row (as torchvision's make_grid); a short last row is black."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    tiles = [_to_pil(image) for image in images]
    width, height = tiles[0].size
    if any(tile.size != (width, height) for tile in tiles):
        raise ValueError(f"image_grid needs equally sized images, got sizes {sorted({t.size for t in tiles})}")
    ncols, nrows = min(nrow, len(tiles)), math.ceil(len(tiles) / nrow)
    grid = Image.new("RGB", (ncols * width, nrows * height))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % nrow) * width, (i // nrow) * height))
    return grid


def _caption(text: str, max_chars: int, line_chars: int) -> str:
    return textwrap.fill(textwrap.shorten(text, max_chars, placeholder="…"), line_chars)


class SampleGrid:
    """A labelled grid of images (one row per model, one column per prompt), kept in one notebook output.

    Parameters:
        cell_size: inches per image.
        max_caption_chars: captions are shortened to this length, then wrapped to the image width.
    """

    def __init__(self, cell_size: float = 2.0, max_caption_chars: int = 80):
        self.cell_size = cell_size
        self.max_caption_chars = max_caption_chars
        self.figure: Figure | None = None
        self._slot = _DisplaySlot()

    def update(
        self,
        rows: Mapping[str, Sequence[ImageLike]],
        title: str | None = None,
        captions: Sequence[str] | None = None,
    ) -> None:
        """Redraw with ``rows`` (e.g. ``{"teacher": [...], "student": [...]}``) and per-column ``captions``."""
        ncols = max(len(images) for images in rows.values())
        if captions is not None and len(captions) > ncols:
            raise ValueError(f"{len(captions)} captions for {ncols} columns")
        caption_lines = 3 if captions else 0
        fig = new_figure((ncols * self.cell_size, len(rows) * self.cell_size + 0.2 * caption_lines + 0.4))
        axes = fig.subplots(len(rows), ncols, squeeze=False)
        for axes_row, (label, images) in zip(axes, rows.items()):
            for ax, image in zip(axes_row, images):
                ax.imshow(np.asarray(_to_pil(image)))
            for ax in axes_row:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.spines[:].set_visible(False)
            axes_row[0].set_ylabel(label)
        line_chars = max(8, int(self.cell_size * 12))
        for ax, caption in zip(axes[0], captions or []):
            ax.set_title(_caption(caption, self.max_caption_chars, line_chars), fontsize="small")
        if title:
            fig.suptitle(title)
        self.figure = fig
        self._slot.show(fig)

    def save(self, path: str | Path) -> None:
        """Write the last grid to a PNG file."""
        if self.figure is None:
            raise RuntimeError("SampleGrid.save() before any update()")
        self.figure.savefig(path, format="png")


# --- small analysis plots ---------------------------------------------------------------------------------


def figure_and_axes(ax, figsize: tuple[float, float]):
    """Draw on ``ax`` when given (a notebook's own layout), else on a new figure."""
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(figsize)
    return fig, fig.add_subplot()


def plot_bars(
    values: Sequence[float] | torch.Tensor,
    labels: Sequence[str] | None = None,
    title: str = "",
    ax=None,
) -> Figure:
    """Bar chart, e.g. per-block importance scores."""
    heights = [float(v) for v in values]
    fig, ax = figure_and_axes(ax, figsize=(max(4.0, 0.3 * len(heights)), 3.0))
    positions = list(range(len(heights)))
    ax.bar(positions, heights)
    if labels is not None:
        ax.set_xticks(positions, list(labels), rotation=90 if len(heights) > 8 else 0)
    ax.set_title(title)
    return fig


def plot_spectrum(
    singular_values: Sequence[float] | torch.Tensor,
    kept_rank: int | None = None,
    ax=None,
    title: str = "Singular values",
) -> Figure:
    """Singular values, largest first, on a log axis; a dashed line marks ``kept_rank`` and its energy share."""
    values = torch.as_tensor(singular_values).detach().float().cpu().sort(descending=True).values
    fig, ax = figure_and_axes(ax, figsize=(5.0, 3.0))
    ax.semilogy(range(1, len(values) + 1), values.tolist(), marker=".")
    if kept_rank is not None:
        energy = float(values[:kept_rank].pow(2).sum() / values.pow(2).sum())
        ax.axvline(kept_rank, color="C3", linestyle="--", label=f"kept rank {kept_rank} ({energy:.1%} energy)")
        ax.legend(fontsize="small")
    ax.set(xlabel="index", ylabel="singular value", title=title)
    return fig


# --- training callback --------------------------------------------------------------------------------------


# What the live plot draws of what distill() logs (metrics.jsonl also has velocity, step, epoch, lr, samples_per_s).
LOSS_KEYS = ("loss", "feature")  # the velocity part equals the loss while feature KD is off


class TrainingMonitor:
    """A `distill()` callback that keeps a live loss plot and a student-vs-teacher sample grid up to date.

    Usage in a notebook: ``distill(..., callbacks=[TrainingMonitor()])``. Each plot is one figure updated in
    place through its display id, so a headless run stores exactly the final figures. `loss_plot_path` and
    `grid_path`, when given, receive PNG copies at the end.
    """

    def __init__(self, loss_plot: LiveLossPlot | None = None, sample_grid: SampleGrid | None = None,
                 loss_plot_path: str | Path | None = None, grid_path: str | Path | None = None):
        self.loss_plot = loss_plot or LiveLossPlot(keys=LOSS_KEYS)
        self.sample_grid = sample_grid or SampleGrid()
        self.loss_plot_path, self.grid_path = loss_plot_path, grid_path

    def on_step(self, step: int, metrics: Mapping[str, object]) -> None:
        self.loss_plot.update(step, metrics)

    def on_samples(self, epoch: int, rows: Mapping[str, Sequence[ImageLike]], captions: Sequence[str]) -> None:
        self.sample_grid.update(rows, title=f"after epoch {epoch}", captions=captions)

    def on_end(self, result) -> None:
        self.loss_plot.close()
        if self.loss_plot_path is not None:
            self.loss_plot.save(self.loss_plot_path)
        if self.grid_path is not None and self.sample_grid.figure is not None:
            self.sample_grid.save(self.grid_path)
