"""Figures read on their own: a title, labelled axes with units, a legend where colours differ, and the
data they claim to show. Read from matplotlib's own objects (titles, labels, plotted arrays), not pixels."""
import dataclasses
import json

import jax
import matplotlib.image
import numpy as np
import pytest

import metrics


def a_values(layers=5):
    rng = np.random.default_rng(0)
    return [(f"layer{i}", (0.9 + 0.02 * i) * np.exp(1j * rng.uniform(0, np.pi, 16))) for i in range(layers)]


def test_smooth_is_the_trailing_mean():
    y = np.random.default_rng(1).normal(size=23)
    want = [y[max(0, i - 4):i + 1].mean() for i in range(len(y))]  # the last 5 values, fewer at the start
    np.testing.assert_allclose(metrics.smooth(y, 5), want, rtol=1e-12)
    np.testing.assert_allclose(metrics.smooth(y, 1), y)


def test_figure_4_9_plots_each_layers_mean_abs_a():
    fig, numbers = metrics.figure_mean_abs_a(a_values())
    (ax,) = fig.axes
    assert ax.get_title() == "Fig. 4.9: mean |a| of each RG-LRU layer"
    assert ax.get_xlabel() == "RG-LRU layer, in network order (0 = first)"
    assert ax.get_ylabel() == "mean |a| over the layer's channels"
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), np.arange(5))
    np.testing.assert_allclose(line.get_ydata(), [0.9, 0.92, 0.94, 0.96, 0.98], rtol=1e-12)
    assert ax.get_ylim() == (0.9, 1.0) and numbers["y_range"] == [0.9, 1.0]


def test_figure_4_7_puts_every_a_in_the_plane_coloured_by_depth():
    values = a_values()
    fig, _ = metrics.figure_complex_plane(values)
    ax, bar = fig.axes
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("Fig. 4.7: a of every RG-LRU channel", "Re a", "Im a")
    (dots,) = ax.collections
    a = np.concatenate([v for _, v in values])
    np.testing.assert_allclose(dots.get_offsets(), np.stack([a.real, a.imag], 1), rtol=1e-12)
    np.testing.assert_array_equal(dots.get_array(), np.repeat(np.arange(5), 16))  # colour = layer
    (circle,) = ax.get_lines()
    np.testing.assert_allclose(np.hypot(circle.get_xdata(), circle.get_ydata()), 1.0, rtol=1e-12)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["unit circle, |a| = 1"]
    assert bar.get_ylabel() == "RG-LRU layer (0 = first, 5 layers)"


def curve_records():
    rng = np.random.default_rng(2)
    train = [{"step": s, "minutes": s / 20, "loss_bits": 8 - s / 100 + rng.normal()} for s in range(10, 510, 10)]
    evals = [{"step": s, "minutes": s / 20 + 0.5, "val_nll_bits": 7 - s / 200, "test_nll_bits": 7.1 - s / 200}
             for s in (250, 500)]
    return train + evals


def test_learning_curves_show_the_smoothed_loss_over_the_raw_one_and_the_evaluations():
    records = curve_records()
    fig = metrics.figure_curves(records, "Learning curves: r")
    assert fig.get_suptitle() == "Learning curves: r"
    by_minutes, by_step = fig.axes
    assert by_minutes.get_xlabel().startswith("wall-clock minutes") and by_step.get_xlabel() == "training step"
    loss = np.array([r["loss_bits"] for r in records[:50]])
    for ax, x_key in ((by_minutes, "minutes"), (by_step, "step")):
        assert ax.get_ylabel() == "bits per sample"
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines) == [
            "training loss (batch)", "training loss, smoothed", "validation NLL (EMA)", "test NLL (EMA)"]
        raw, smoothed = lines["training loss (batch)"], lines["training loss, smoothed"]
        np.testing.assert_allclose(raw.get_xdata(), [r[x_key] for r in records[:50]])
        np.testing.assert_allclose(raw.get_ydata(), loss)
        assert raw.get_alpha() < 0.5 and smoothed.get_alpha() in (None, 1.0)  # faint under the smoothed line
        np.testing.assert_allclose(smoothed.get_ydata(), [loss[max(0, i - 6):i + 1].mean() for i in range(50)])  # 7 ~ sqrt(50)
        np.testing.assert_allclose(lines["validation NLL (EMA)"].get_ydata(), [5.75, 4.5])
        np.testing.assert_allclose(lines["test NLL (EMA)"].get_xdata(), [r[x_key] for r in records[50:]])


def test_a_skipped_updates_nan_loss_is_left_out_of_the_curves():
    records = curve_records()
    records[5]["loss_bits"] = float("nan")  # train.py logs a skipped update's loss as it was
    (_, by_step) = metrics.figure_curves(records).axes
    lines = {line.get_label(): line for line in by_step.get_lines()}
    assert len(lines["training loss (batch)"].get_xdata()) == 49 and 60 not in lines["training loss (batch)"].get_xdata()
    assert np.isfinite(lines["training loss, smoothed"].get_ydata()).all()


def test_learning_curves_mark_where_a_warm_started_leg_begins():
    records = curve_records() + [{"step": 500, "minutes": 25.0, "leg": 2, "warm_start": ["ema-1of2.npz"]},
                                 {"step": 510, "minutes": 25.5, "loss_bits": 3.0}]
    for ax, x in zip(metrics.figure_curves(records).axes, (25.0, 500)):
        (mark,) = [line for line in ax.get_lines() if line.get_label() == "leg 2 begins (warm start)"]
        assert list(mark.get_xdata()) == [x, x]


def test_learning_curves_without_minutes_draw_the_steps_only():
    records = [{k: v for k, v in r.items() if k != "minutes"} for r in curve_records()]
    (ax,) = metrics.figure_curves(records).axes
    assert ax.get_xlabel() == "training step"
    with pytest.raises(ValueError, match="no loss_bits"):
        metrics.figure_curves([{"step": 1}])


def test_spectrogram_figure_labels_every_tile_and_shows_each_clip():
    t = np.arange(16000) / 16000
    clips = np.stack([np.sin(2 * np.pi * f * t) for f in (300, 2000, 5000)])
    labels = [f"#{i}: 2.{i}0 bits/sample\nheard 'seven' 9{i}%" for i in range(3)]
    fig = metrics.figure_spectrograms(clips, 16000, labels, title="3 tones", mark_seconds=0.25)
    assert fig.get_suptitle() == "3 tones"
    assert fig._supxlabel.get_text() == "time (s)" and fig._supylabel.get_text() == "frequency (kHz, mel scale)"
    tiles = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in tiles] == labels
    assert [ax.get_visible() for ax in fig.axes[:4]] == [True, True, True, False]  # a 2 x 2 grid, one unused
    db, _ = metrics.spectrogram_db(clips, 16000)
    for ax, want in zip(tiles, db):
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), want)
        (mark,) = ax.get_lines()
        assert list(mark.get_xdata()) == [0.25, 0.25]
    peaks = [int(np.argmax(d.mean(1))) for d in db]
    assert peaks[0] < peaks[1] < peaks[2]  # higher tones in higher mel bands
    assert [t.get_text() for t in tiles[0].get_yticklabels()] == ["0", "1", "2", "4", "8"]
    assert fig.axes[-1].get_ylabel() == "dB below the clip's loudest point"


def test_saved_figures_are_pngs(tmp_path):
    path = str(tmp_path / "f.png")
    metrics.save_figure(metrics.figure_curves(curve_records()), path, dpi=50)
    img = matplotlib.image.imread(path)
    assert img.shape == (360, 400, 4) and img[..., :3].std() > 0.05  # 8 x 7.2 inches at 50 dpi, not blank


def test_figures_command_draws_learning_curves_from_the_log(tmp_path, monkeypatch):
    pf, train = pytest.importorskip("pf"), pytest.importorskip("train")
    cfg = pf.Config(pooling=(2,), layers=(1, 1), d_model=8, d_rnn=64)
    params = jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    train.save_checkpoint(str(tmp_path / "best.npz"), {"ema": params}, {"model": dataclasses.asdict(cfg), "step": 30})
    records = curve_records()
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn, real = [], metrics.figure_curves
    monkeypatch.setattr(metrics, "figure_curves", lambda recs, title: drawn.append((recs, title)) or real(recs, title))
    metrics.main(["figures", "--checkpoint", str(tmp_path)])
    assert drawn == [(records, f"Learning curves: {tmp_path}")]
    assert matplotlib.image.imread(str(tmp_path / "curves.png")).shape[2] == 4


def test_compare_figure_puts_runs_of_any_size_on_minutes_and_tokens(tmp_path):
    """`metrics.py compare RUN... --figure`: each run's validation NLL against minutes and against the
    tokens fed (step x batch x sequence length, log scale), labelled as asked."""
    runs = {"gpu": (32, 16000, [(200, 3.0, 5.0), (400, 5.0, 4.5)]), "cpu": (4, 16000, [(250, 2.5, 5.6)])}
    for name, (batch, seq_len, evals) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"model": {}, "train": {"batch_size": batch}, "data": {"seq_len": seq_len}}))
        records = [{"step": s, "minutes": m, "val_nll_bits": v, "test_nll_bits": v + 0.1} for s, m, v in evals]
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = str(tmp_path / "cmp.png")
    metrics.main(["compare", str(tmp_path / "gpu"), str(tmp_path / "cpu"), "--figure", out,
                  "--labels", "thesis baseline, H100", "CPU preset"])
    assert matplotlib.image.imread(out).shape[2] == 4
    by_minutes, by_tokens = metrics.figure_compare([str(tmp_path / "gpu"), str(tmp_path / "cpu")], ["a", "b"]).axes
    assert by_tokens.get_xscale() == "log" and by_tokens.get_xlabel().startswith("training tokens")
    (a_min, b_min), (a_tok, b_tok) = by_minutes.get_lines(), by_tokens.get_lines()
    assert list(a_min.get_xdata()) == [3.0, 5.0] and list(a_min.get_ydata()) == [5.0, 4.5]
    assert list(a_tok.get_xdata()) == [200 * 32 * 16000, 400 * 32 * 16000] and list(b_tok.get_xdata()) == [250 * 4 * 16000]
    assert [t.get_text() for t in by_tokens.get_legend().get_texts()] == ["a", "b"]
