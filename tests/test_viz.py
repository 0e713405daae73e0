"""Display helpers: tables, saved figures, grid geometry, and one notebook output per live figure."""

import base64
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from wandistiller import viz
from wandistiller.viz import LiveLossPlot, SampleGrid, image_grid, plot_bars, plot_spectrum


def _metrics(step: int) -> dict:
    return {"loss": 1.0 / (step + 1), "velocity": 0.8 / (step + 1), "feature": 0.0, "lr": 1e-4, "note": "x"}


def _line(fig, label: str):
    lines = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == label]
    assert len(lines) == 1, f"expected one {label!r} line, got {len(lines)}"
    return lines[0]


@pytest.fixture
def ipython_shell(monkeypatch, tmp_path):
    """A real IPython shell for the duration of a test, so get_ipython() finds it.

    Creating a shell swaps sys.modules["__main__"] and adds builtins; restoring them keeps later tests
    (multiprocessing spawn, libraries that sniff for IPython) unaffected. Its profile lives in tmp_path.
    """
    import builtins

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    for name in ("__IPYTHON__", "display"):
        monkeypatch.setattr(builtins, name, None, raising=False)
    config = Config()
    config.HistoryAccessor.enabled = False
    yield InteractiveShell.instance(config=config)
    InteractiveShell.clear_instance()


def test_live_loss_plot_saves_png_with_every_step(tmp_path):
    plot = LiveLossPlot(redraw_every=10, figsize=(7, 3.5))
    for step in range(50):
        plot.update(step, _metrics(step))
    plot.save(tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as png:
        assert png.size == (700, 350)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert list(_line(plot.figure, "loss").get_xdata()) == list(range(50))
    np.testing.assert_allclose(_line(plot.figure, "velocity").get_ydata(), [0.8 / (s + 1) for s in range(50)])
    assert _line(plot.figure, "lr").axes is not plot.figure.axes[0]  # learning rate on its twin axis
    assert plot.figure.axes[0].get_yscale() == "log"
    labels = [line.get_label() for ax in plot.figure.axes for line in ax.get_lines()]
    assert "feature" not in labels and "note" not in labels  # all-zero part, non-numeric metric


def test_live_loss_plot_accepts_tensors_and_a_resumed_run_replaces_later_steps(tmp_path):
    plot = LiveLossPlot(keys=["loss"])
    for step in range(10):
        plot.update(step, {"loss": torch.tensor(1.0 + step)})
    for step in range(5, 8):  # resumed from a checkpoint at step 5
        plot.update(step, {"loss": torch.tensor(100.0 + step)})
    plot.save(tmp_path / "loss.png")
    line = _line(plot.figure, "loss")
    assert list(line.get_xdata()) == list(range(8))
    assert list(line.get_ydata()) == [1, 2, 3, 4, 5, 105, 106, 107]


def test_from_metrics_file_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, **_metrics(s)}) for s in range(0, 30, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 30, "lo')
    plot = LiveLossPlot.from_metrics_file(path)
    assert list(_line(plot.figure, "loss").get_xdata()) == list(range(0, 30, 3))
    path.write_text('{"step": 0, "lo\n' + lines[1])
    with pytest.raises(json.JSONDecodeError):
        LiveLossPlot.from_metrics_file(path)


def _solid(color, size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_image_grid_places_images_row_by_row():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    grid = image_grid([_solid(c) for c in colors], nrow=3)
    assert grid.size == (3 * 8, 2 * 6)
    assert grid.getpixel((0, 6)) == colors[3]  # 4th image starts the second row
    assert grid.getpixel((2 * 8, 6)) == (0, 0, 0)  # the short last row is padded black
    assert image_grid([_solid(c) for c in colors[:2]], nrow=3).size == (2 * 8, 6)
    array = np.full((6, 8, 3), 0.5)
    assert image_grid([array], nrow=1).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ValueError, match="equally sized"):
        image_grid([_solid(colors[0]), _solid(colors[1], size=(4, 4))], nrow=2)


def test_sample_grid_saves_png_with_labels_and_short_captions(tmp_path):
    grid = SampleGrid(cell_size=2.0, max_caption_chars=30)
    rows = {"teacher": [_solid((200, 0, 0), (16, 16))] * 3, "student": [np.zeros((16, 16, 3), np.uint8)] * 3}
    captions = ["a red cube on a table in a very long caption that must be shortened", "b", "c"]
    grid.update(rows, title="step 100", captions=captions)
    grid.save(tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as png:
        assert png.size[0] == 600 and png.size[1] > 400
    axes = np.array(grid.figure.axes).reshape(2, 3)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["teacher", "student"]
    assert len(axes[0, 0].get_title()) <= 31 and axes[0, 0].get_title().endswith("…")
    with pytest.raises(RuntimeError, match="before any update"):
        SampleGrid().save(tmp_path / "nothing.png")


def test_analysis_plots_return_figures():
    bars = plot_bars([0.3, 0.1, 0.6], labels=["block 0", "block 1", "block 2"], title="importance")
    assert [p.get_height() for p in bars.axes[0].patches] == pytest.approx([0.3, 0.1, 0.6])
    spectrum = plot_spectrum(torch.tensor([1.0, 3.0, 2.0, 0.5]), kept_rank=2)
    assert list(spectrum.axes[0].get_lines()[0].get_ydata()) == [3.0, 2.0, 1.0, 0.5]  # sorted, largest first
    # energy kept: (9 + 4) / (9 + 4 + 1 + 0.25)
    assert "kept rank 2 (91.2% energy)" in spectrum.axes[0].get_legend().get_texts()[0].get_text()


def test_table_formats_numbers():
    table = viz.Table(("name", "count", "value"), [("a", 1234567, 0.123456), ("bb", 2, None)], "title")
    lines = str(table).splitlines()
    assert lines[0] == "title" and "1,234,567" in lines[3] and "0.1235" in lines[3] and lines[4].endswith("-")
    assert table.column("count") == [1234567, 2]


def test_a_multi_line_table_title_keeps_its_lines_in_html():
    # The projection report's summary is such a title: its lines must not run together in a notebook.
    table = viz.Table(("a",), [(1,)], "first line\nsecond <line>")
    assert table._repr_html_().startswith("<p>first line<br>second &lt;line&gt;</p><table>")
    assert str(table).splitlines()[:2] == ["first line", "second <line>"]


def test_nothing_is_displayed_outside_ipython(monkeypatch, tmp_path):
    import IPython.display

    calls = []
    monkeypatch.setattr(IPython.display, "display", lambda *args, **kwargs: calls.append(args))
    plot = LiveLossPlot(redraw_every=1)
    for step in range(5):
        plot.update(step, _metrics(step))
    plot.close()
    SampleGrid().update({"student": [_solid((0, 0, 0))]})
    assert calls == []
    # Without IPython installed at all, the plot still records and saves.
    monkeypatch.setitem(sys.modules, "IPython", None)
    plot.update(5, _metrics(5))
    plot.save(tmp_path / "loss.png")
    assert list(_line(plot.figure, "loss").get_xdata()) == list(range(6))


def test_live_plot_keeps_one_output_updated_in_place_inside_ipython(ipython_shell):
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        plot = LiveLossPlot(redraw_every=5, draw_share=0)
        for step in range(48):
            plot.update(step, _metrics(step))
        plot.close()
    created = [o for o in captured.outputs if not o.update]
    updates = [o for o in captured.outputs if o.update]
    assert len(created) == 1 and "image/png" in created[0].data
    # First update shows at once, then every 5 updates (47 // 5 = 9 times), and close() shows the last 3.
    assert len(updates) == 10
    display_ids = {o.transient["display_id"] for o in captured.outputs}
    assert len(display_ids) == 1
    final_png = Image.open(io.BytesIO(base64.b64decode(updates[-1].data["image/png"])))
    assert final_png.size == (700, 350)


def test_live_plot_spends_at_most_its_draw_share_of_the_time_drawing(ipython_shell, monkeypatch):
    import types

    from IPython.utils.capture import capture_output

    import wandistiller.viz as viz

    clock = [0.0]
    monkeypatch.setattr(viz, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    draws = []
    plot = LiveLossPlot(redraw_every=1, draw_share=1 / 16)
    real_draw = plot._draw

    def slow_draw():  # each redraw takes 1/8 s of the fake clock, as does each training step (exact in binary)
        draws.append(clock[0])
        real_draw()
        clock[0] += 0.125

    monkeypatch.setattr(plot, "_draw", slow_draw)
    with capture_output():
        for step in range(100):
            plot.update(step, _metrics(step))
            clock[0] += 0.125
    # After a 1/8 s redraw the next waits (1/8) / (1/16) = 2 s: redraws start 2 + 1/8 s apart, i.e. drawing takes
    # 1/17 of the time, under the 1/16 share; with draw_share=0 all 100 updates would redraw.
    assert draws[0] == 0 and set(np.diff(draws)) == {2.125}
    assert len(draws) == 7  # at 0, 2.125, ..., 12.75 of the 12.5 s of steps plus 0.875 s of drawing
    with pytest.raises(ValueError, match="draw_share"):
        LiveLossPlot(draw_share=1.5)


def test_sample_grid_updates_one_output_and_figures_render_as_png(ipython_shell):
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        grid = SampleGrid()
        for shade in (0, 128, 255):
            grid.update({"student": [_solid((shade,) * 3)] * 2}, captions=["a", "b"])
    assert [o.update for o in captured.outputs] == [False, True, True]
    # A figure returned as a cell's result shows as an image even though pyplot was never imported.
    formatted, _ = ipython_shell.display_formatter.format(plot_bars([1.0, 2.0]))
    assert "image/png" in formatted
