"""Every table and figure: live loss curves, sample grids, tables, and the analysis and projection plots.

The computing modules (`analysis`, `projection`, `evaluate`) return data; what a notebook shows of it is made here.

Figures are `matplotlib.figure.Figure` objects made without pyplot, so nothing here selects a backend or
opens a window, and the same code runs in JupyterLab, under papermill and in a plain script. Inside IPython a
live figure occupies exactly one output, replaced in place through a display id: a notebook executed
headless stores the final figure once, not one copy per redraw. Outside IPython nothing is displayed; call
``save`` to keep a figure.
"""

from __future__ import annotations

import html
import io
import json
import math
import numbers
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


# --- tables -----------------------------------------------------------------------------------------------


def format_value(value) -> str:
    """A table cell: thousands separators for integers, 4 significant digits for floats, "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass(repr=False)
class Table:
    """Rows for reading in a notebook: prints as fixed-width text, renders as HTML, `column(name)` for plots."""

    columns: tuple[str, ...]
    rows: list[tuple]
    title: str = ""

    def column(self, name: str) -> list:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    def to_records(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]

    def __str__(self) -> str:
        cells = [self.columns] + [tuple(format_value(v) for v in row) for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        # Numbers right-aligned, text left-aligned (judged on the first row).
        first = self.rows[0] if self.rows else ()
        numeric = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in first] + [False] * len(widths)
        fmt = lambda row: "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(row, widths, numeric)).rstrip()
        lines = [self.title] if self.title else []
        return "\n".join(lines + [fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        cells = lambda row, tag: "".join(f"<{tag}>{html.escape(format_value(v))}</{tag}>" for v in row)
        body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in self.rows)
        title = html.escape(self.title).replace("\n", "<br>")  # a multi-line title keeps its lines
        title = f"<p>{title}</p>" if self.title else ""
        return f"{title}<table><thead><tr>{cells(self.columns, 'th')}</tr></thead><tbody>{body}</tbody></table>"


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
    then redrawn in place every ``redraw_every`` updates, but no sooner than ``draw_share`` allows; elsewhere updates
    only record, and ``save`` draws.
    Create the plot in the cell that trains, so the output lands under that cell.

    Parameters:
        keys: metric names to plot; None plots every numeric metric except ``step`` and ``lr``.
        redraw_every: updates between redraws (drawing costs tens of milliseconds).
        draw_share: the largest share of the time between redraws spent drawing: after a redraw that took d
            seconds the next waits at least d / draw_share seconds (0.05: 20 d), so a long run's growing curves
            never cost more than about 5 % of its time; 0: redraw every ``redraw_every`` updates regardless.
        log_y: log-scale loss axis. A part that is zero throughout (e.g. feature KD switched off) is left out,
            since a log axis cannot draw it.
    """

    def __init__(
        self,
        keys: Sequence[str] | None = None,
        redraw_every: int = 10,
        draw_share: float = 0.05,
        log_y: bool = True,
        title: str = "Distillation loss",
        figsize: tuple[float, float] = (7.0, 3.5),
    ):
        self.keys = list(keys) if keys is not None else None
        if not 0 <= draw_share <= 1:
            raise ValueError(f"draw_share={draw_share!r} must be in [0, 1]: e.g. 0.05 (at most 5 % of the time drawing) "
                             "or 0 (redraw every redraw_every updates)")
        self.redraw_every = redraw_every
        self.draw_share = draw_share
        self.log_y = log_y
        self.title = title
        self.figure = new_figure(figsize)
        self.records: list[dict[str, float]] = []
        self._seen_keys: dict[str, None] = {}  # insertion-ordered set: legend order = first appearance
        self._pending = 0
        self._next_draw = 0.0  # time.monotonic() before which a due redraw waits (draw_share)
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
        due = (self._pending >= self.redraw_every and time.monotonic() >= self._next_draw) or len(self.records) == 1
        if due and _ipython_shell() is not None:
            self.show()

    def show(self) -> None:
        """Redraw now and put the figure in its notebook output (no-op display outside IPython)."""
        started = time.monotonic()
        self._draw()
        self._slot.show(self.figure)
        self._pending = 0
        now = time.monotonic()
        self._next_draw = now + (now - started) / self.draw_share if self.draw_share > 0 else now

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


# --- analysis plots ---------------------------------------------------------------------------------------


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


def subplots(ncols: int, nrows: int = 1, figsize: tuple[float, float] | None = None):
    """A pyplot-free figure and its axes (a flat list), for composing `plot_bars` / `plot_spectrum` panels."""
    fig = new_figure(figsize or (4.0 * ncols, 3.0 * nrows))
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).flat)



def expert_schedule_summary(schedule) -> str:
    """The steps each expert takes in an `analysis.ExpertSchedule`, in words."""
    n = len(schedule.timesteps)
    boundary = "no boundary (one expert)" if schedule.boundary is None else f"boundary t >= {schedule.boundary:g}"
    parts = []
    for name in dict.fromkeys(schedule.experts):
        steps = [i for i, e in enumerate(schedule.experts) if e == name]
        parts.append(f"{name}: {len(steps)} steps ({steps[0]}-{steps[-1]}), t {schedule.timesteps[steps[0]]:g} down to "
                     f"{schedule.timesteps[steps[-1]]:g}, guidance {schedule.guidance[steps[0]]:g}")
    return f"{n} steps, {boundary}\n" + "\n".join(parts)


def plot_expert_schedule(schedule, ax=None) -> Figure:
    """Timestep per sampling step of an `analysis.ExpertSchedule`, coloured by expert, the boundary dashed."""
    fig, ax = figure_and_axes(ax, figsize=(6.0, 3.0))
    roles = {"transformer": " (high noise)", "transformer_2": " (low noise)"} if schedule.boundary is not None else {}
    for i, name in enumerate(dict.fromkeys(schedule.experts)):
        steps = [s for s, e in enumerate(schedule.experts) if e == name]
        ax.bar(steps, [schedule.timesteps[s] for s in steps], color=f"C{i}", label=name + roles.get(name, ""))
    if schedule.boundary is not None:
        ax.axhline(schedule.boundary, color="0.3", linestyle="--", label=f"boundary {schedule.boundary:g}")
    ax.set(xlabel="sampling step", ylabel="timestep t", title="Expert per sampling step")
    ax.legend(fontsize="small", loc="upper right")
    return fig


def plot_attention_maps(maps, head: int = 0, query: int | None = None) -> Figure:
    """An `analysis.AttentionMaps`: the full N x N map and, on the latent grid, where one query token looks
    (default: the centre)."""
    h, w = maps.grid
    query = (h // 2) * w + w // 2 if query is None else query
    fig, (ax_map, ax_grid) = subplots(2, figsize=(9.0, 4.0))
    image = ax_map.imshow(maps.weights[head].cpu(), cmap="viridis")
    fig.colorbar(image, ax=ax_map, shrink=0.8, label="attention weight")
    ax_map.set(xlabel="key token", ylabel="query token", title=f"block {maps.block}, head {head}: all {h * w} tokens")
    image = ax_grid.imshow(maps.weights[head, query].reshape(h, w).cpu(), cmap="viridis")
    ax_grid.plot(query % w, query // w, marker="x", color="red", markersize=10, linestyle="none",
                 label=f"query token {query}")
    fig.colorbar(image, ax=ax_grid, shrink=0.8, label="attention weight")
    ax_grid.set(xlabel="patch column", ylabel="patch row", title=f"where token {query} looks ({h}x{w} patches)")
    ax_grid.legend(fontsize="small", loc="lower right")
    fig.suptitle(f"self-attention at t = {maps.timestep:g}")
    return fig


def plot_depth_map(depth_map: list[int], num_teacher_layers: int, ax=None):
    """Teacher blocks (left) and student blocks (right), a line from each student block to its source."""
    fig, ax = figure_and_axes(ax, figsize=(3.5, max(2.5, 0.25 * num_teacher_layers + 1)))
    depth = len(depth_map)
    # Student blocks spread over the teacher's height, so the lines show where each one comes from.
    student_y = [0.0] if depth == 1 else [i * (num_teacher_layers - 1) / (depth - 1) for i in range(depth)]
    for s, t in enumerate(depth_map):
        ax.plot([0, 1], [t, student_y[s]], color="C0", linewidth=1.5)
    kept = set(depth_map)
    ax.scatter([0] * num_teacher_layers, range(num_teacher_layers), s=60, zorder=3,
               color=["C0" if t in kept else "0.8" for t in range(num_teacher_layers)])
    ax.scatter([1] * depth, student_y, s=60, color="C1", zorder=3)
    for t in range(num_teacher_layers):
        ax.annotate(str(t), (0, t), xytext=(-8, 0), textcoords="offset points", ha="right", va="center",
                    fontsize="small")
    for s, y in enumerate(student_y):
        ax.annotate(str(s), (1, y), xytext=(8, 0), textcoords="offset points", ha="left", va="center",
                    fontsize="small")
    ax.set_xticks([0, 1], ["teacher block", "student block"])
    ax.set_yticks([])
    ax.set_xlim(-0.4, 1.4)
    ax.invert_yaxis()  # block 0 (the input end) on top
    ax.spines[:].set_visible(False)
    ax.set_title(f"depth map: {num_teacher_layers} -> {depth} blocks")
    return fig


def plot_importance(scores, kept=None, labels=None, title: str = "", ax=None):
    """`plot_bars` of importance scores with the units the student keeps in colour and the others grey."""
    from matplotlib.patches import Patch

    fig = plot_bars(scores, labels=labels, title=title, ax=ax)
    ax = ax or fig.axes[-1]
    if kept is not None:
        kept = {int(i) for i in kept}
        for i, bar in enumerate(ax.patches[-len(scores):]):
            bar.set_color("C0" if i in kept else "0.75")
        ax.legend(handles=[Patch(color="C0", label="kept"), Patch(color="0.75", label="removed")], fontsize="small")
    return fig


def importance_figure(report, block: int = 0):
    """The importance scores behind a projection and what it kept: blocks, self-attention heads (all teacher
    blocks), the FFN neurons of student block `block`'s source, and residual channels."""
    imp, plan = report.importance, report.plan
    if imp is None:
        raise ValueError("this projection measured no importance (layers and width were not 'importance')")
    layers, heads = imp.self_heads.shape
    source = report.depth_map[block]
    kept_heads = {t * heads + int(h) for s, t in enumerate(report.depth_map) for h in plan.self_heads[s]}
    fig, axes = subplots(2, 2, figsize=(11.0, 6.0))
    plot_importance(imp.block_influence, report.depth_map, [str(i) for i in range(layers)],
                    "block influence (1 - cos), kept = depth map", axes[0])
    plot_importance(imp.self_heads.flatten(), kept_heads, [f"{t}.{h}" for t in range(layers) for h in range(heads)],
                    "self-attention heads (block.head)", axes[1])
    plot_importance(imp.ffn_neurons[source], plan.ffn_neurons[block], None,
                    f"FFN neurons of teacher block {source}", axes[2])
    plot_importance(imp.channels, plan.channels, None, "residual-stream channels", axes[3])
    for ax in axes[2:]:
        ax.set_xlabel("index")
    return fig


def plot_spectra(weights: dict[str, torch.Tensor], kept_rank: dict[str, int]):
    """`plot_spectrum` of several teacher matrices side by side, each with the rank a student of this size keeps."""
    fig, axes = subplots(len(weights), figsize=(4.5 * len(weights), 3.2))
    for ax, (name, weight) in zip(axes, weights.items()):
        plot_spectrum(torch.linalg.svdvals(weight.detach().float().cpu()), kept_rank[name], ax=ax,
                      title=f"{name} {tuple(weight.shape)}")
    return fig



# --- the projection report --------------------------------------------------------------------------------

PROJECTION_COLUMNS = ("parameter", "kind", "teacher source", "shape", "source shape", "energy", "note")


def projection_summary(report) -> str:
    """What a `projection.ProjectionReport` did, in a few lines: sizes, methods, depth map, elements by kind."""
    ratio = report.student_parameters / report.teacher_parameters
    counts = ", ".join(f"{k} {v:,}" for k, v in report.counts().items() if v)
    lines = [
        f"Projection{' plan (meta device)' if report.plan_only else ''}: {report.teacher_parameters:,} teacher "
        f"parameters ({'+'.join(report.experts)}, expert={report.expert}) -> {report.student_parameters:,} student "
        f"({ratio:.2%}); layers={report.layers!r}, width={report.width!r}",
        f"depth map (student block -> teacher block): {report.depth_map}",
        f"elements by kind: {counts}",
    ]
    return "\n".join(lines + report.notes)


def projection_table(report) -> Table:
    """One row per student parameter of a `projection.ProjectionReport`, titled with its summary."""
    rows = []
    for r in report.records:
        energy = "-" if r.energy_kept is None else f"{r.energy_kept:.3f}"
        rows.append((r.name, r.kind, r.source or "-", "x".join(map(str, r.shape)),
                     "x".join(map(str, r.source_shape)) if r.source_shape else "-", energy, r.note))
    return Table(PROJECTION_COLUMNS, rows, projection_summary(report))


# --- training callback ------------------------------------------------------------------------------------


# What the live plot draws of what distill() logs (metrics.jsonl also has velocity, step, epoch, lr, samples_per_s).
LOSS_KEYS = ("loss", "feature")  # the velocity part equals the loss while feature KD is off


class TrainingMonitor:
    """A `distill()` callback (it has every hook of `wandistiller.Callback`) that keeps a live loss plot and a
    student-vs-teacher sample grid up to date.

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

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Nothing to show for a checkpoint."""

    def on_samples(self, epoch: int, rows: Mapping[str, Sequence[ImageLike]], captions: Sequence[str]) -> None:
        self.sample_grid.update(rows, title=f"after epoch {epoch}", captions=captions)

    def on_end(self, result) -> None:
        self.loss_plot.close()
        if self.loss_plot_path is not None:
            self.loss_plot.save(self.loss_plot_path)
        if self.grid_path is not None and self.sample_grid.figure is not None:
            self.sample_grid.save(self.grid_path)
