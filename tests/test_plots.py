"""plots.py: histogram and loss figures have the traces and lines the UI relies on."""

from types import SimpleNamespace

from ruozhi_ui import plots
from ruozhi_ui.events import EvalDone, StepLogged


def _summary(p95):
    return SimpleNamespace(min=1, max=10, mean=5.0, p50=5.0, p90=8.0, p95=p95, p99=9.5)


def _stats():
    lengths = {"instruction": [1, 2, 3], "output": [4, 5, 6], "prompt": [7, 8, 9], "total": [12, 14, 16]}
    return SimpleNamespace(lengths=lengths, instruction=_summary(3.0), output=_summary(6.0),
                           prompt=_summary(9.0), total=_summary(16.0))


def _step(i, loss):
    return StepLogged(step=i, epoch=i / 10, loss=loss, lr=1e-4, tok_per_s=100.0, elapsed_s=float(i), eta_s=1.0,
                      mem_gib=0.0, num_steps=10)


def test_length_histograms_have_one_histogram_per_field():
    fig = plots.length_histograms(_stats(), 62, 151, "en")
    assert [tr.type for tr in fig.data] == ["histogram"] * 4
    assert [list(tr.x) for tr in fig.data] == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [12, 14, 16]]


def test_length_histograms_draw_p95_and_limit_lines():
    fig = plots.length_histograms(_stats(), 62, 151, "en")
    xs = sorted(shape.x0 for shape in fig.layout.shapes)
    # p95 of each field, then the limits: output 151, prompt 62, total 62 + 151 + 1
    assert xs == sorted([3.0, 6.0, 9.0, 16.0, 151, 62, 214])


def test_loss_figure_with_one_step_has_one_point():
    fig = plots.loss_figure([_step(1, 2.5)], [], "en")
    raw = fig.data[0]
    assert list(raw.x) == [1] and list(raw.y) == [2.5]
    assert "markers" in raw.mode


def test_loss_figure_has_train_ema_and_val_traces():
    steps = [_step(i, 3.0 - i * 0.1) for i in range(1, 11)]
    evals = [EvalDone(step=5, epoch=1, val_loss=2.6, val_ppl=13.5), EvalDone(step=10, epoch=2, val_loss=2.2, val_ppl=9.0)]
    fig = plots.loss_figure(steps, evals, "en")
    assert len(fig.data) == 3
    assert list(fig.data[2].x) == [5, 10] and list(fig.data[2].y) == [2.6, 2.2]


def test_loss_figure_downsamples_long_curves_keeping_the_last_step():
    steps = [_step(i, 1.0) for i in range(1, 5001)]
    fig = plots.loss_figure(steps, [], "en")
    assert len(fig.data[0].x) <= plots.MAX_POINTS
    assert fig.data[0].x[-1] == 5000


def test_smoothing_a_constant_gives_the_constant():
    assert plots.smooth([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]


def test_smoothing_a_falling_line_does_not_lag_above_it():
    line = [10.0 - i for i in range(100)]
    smoothed = plots.smooth(line)
    assert smoothed[10:90] == line[10:90]  # centred: an average of a line is the line


def test_runs_figure_overlays_each_runs_train_and_validation_loss():
    from types import SimpleNamespace

    a = SimpleNamespace(name="a", steps=((1, 3.0), (2, 2.0)), evals=((2, 2.5),))
    b = SimpleNamespace(name="b", steps=((1, 4.0),), evals=())
    fig = plots.runs_figure([a, b], "en")
    assert [tr.name for tr in fig.data] == ["a: train loss (smoothed)", "a: validation loss", "b: train loss (smoothed)"]
    assert fig.data[0].line.color == fig.data[1].marker.color != fig.data[2].line.color


def test_empty_figure_shows_the_message():
    fig = plots.empty_figure("nothing yet")
    assert fig.data == () and fig.layout.annotations[0].text == "nothing yet"
