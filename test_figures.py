"""Figures read on their own: a title, labelled axes with units, labelled ticks, a legend where colours
differ. Text is found in the rendered pixels (the font's own glyphs, matched by correlation)."""
import dataclasses
import json

import jax
import numpy as np
import pytest

import metrics


def contains_text(img, text, scale=1, vertical=False):
    """Whether the black pixels of `text` in the 5x7 font appear somewhere in img (exactly black)."""
    mask = metrics.text_mask(text, scale)
    mask = np.rot90(mask) if vertical else mask
    dark = (np.asarray(img) == 0).all(-1).astype(np.float64)
    if mask.shape[0] > dark.shape[0] or mask.shape[1] > dark.shape[1]:
        return False
    shape = dark.shape
    corr = np.fft.irfft2(np.fft.rfft2(dark) * np.conj(np.fft.rfft2(mask.astype(np.float64), shape)), shape)
    return bool(np.max(corr) > mask.sum() - 0.5)


def test_font_has_a_distinct_glyph_for_every_printable_ascii_character():
    chars = [chr(c) for c in range(32, 127)]
    assert sorted(metrics._GLYPHS) == sorted(chars)
    masks = {ch: metrics.text_mask(ch) for ch in chars}
    assert all(m.shape == (7, 6) and not m[:, 5].any() for m in masks.values())  # 5 columns and a space
    seen = {}
    for ch, m in masks.items():
        assert m.tobytes() not in seen, f"{ch!r} draws like {seen[m.tobytes()]!r}"
        seen[m.tobytes()] = ch
    assert metrics.text_mask("A")[:, :5].astype(int).tolist() == [
        [0, 1, 1, 1, 0], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 1],
        [1, 0, 0, 0, 1]]
    assert metrics.text_mask("ab", 2).shape == (14, 24)


def test_nice_ticks_are_round_and_cover_the_range():
    assert metrics.nice_ticks(0.9, 1.0) == [0.9, 0.92, 0.94, 0.96, 0.98, 1.0]
    assert metrics.nice_ticks(-0.5, 35.5, integer=True) == [0, 10, 20, 30]
    assert metrics.nice_ticks(0, 1, 3) == [0, 0.5, 1.0]
    assert [metrics.tick_label(v, [0, 2.5]) for v in (0, 2.5, 5)] == ["0.0", "2.5", "5.0"]
    assert metrics.tick_label(0.92, [0.9, 0.92]) == "0.92"


def a_values(layers=5):
    rng = np.random.default_rng(0)
    return [(f"layer{i}", (0.9 + 0.02 * i) * np.exp(1j * rng.uniform(0, np.pi, 16))) for i in range(layers)]


def test_figure_4_9_has_title_axis_labels_and_ticks():
    img, _ = metrics.figure_mean_abs_a(a_values())
    assert contains_text(img, "Fig. 4.9: mean |a| of each RG-LRU layer", 2)
    assert contains_text(img, "RG-LRU layer, in network order (0 = first)")
    assert contains_text(img, "mean |a| over the layer's channels", vertical=True)
    for tick in ("0.90", "0.96", "1.00", "0", "4"):
        assert contains_text(img, tick), tick


def test_figure_4_7_has_axes_and_a_colour_legend_for_depth():
    img, _ = metrics.figure_complex_plane(a_values())
    assert img.shape == (480, 480, 3)
    for text in ("Re a", "-0.5", "1.0", "colour = layer:", "first", "last (5 layers)", "unit circle, |a| = 1"):
        assert contains_text(img, text), text
    assert contains_text(img, "Im a", vertical=True)
    first, last = metrics.depth_color(0.0), metrics.depth_color(1.0)
    for color in (first, last):  # the legend's colour bar holds both ends of the depth scale
        assert (img[380:] == color).all(-1).any()


def test_line_plot_draws_a_legend_only_when_colours_differ():
    one = [{"label": "only series", "x": [0, 1, 2], "y": [3, 1, 2]}]
    two = one + [{"label": "second series", "x": [0, 2], "y": [2, 2.5], "style": "line+dots"}]
    plain = metrics.line_plot(one, "T", "x (s)", "y (bits)")
    assert not contains_text(plain, "only series")
    legend = metrics.line_plot(two, "T", "x (s)", "y (bits)")
    assert contains_text(legend, "only series") and contains_text(legend, "second series")
    assert contains_text(legend, "x (s)") and contains_text(legend, "y (bits)", vertical=True)


def test_spectrogram_figure_labels_every_tile_and_its_axes():
    t = np.arange(16000) / 16000
    clips = np.stack([np.sin(2 * np.pi * f * t) for f in (300, 2000, 5000)])
    labels = [f"#{i}: 2.{i}0 bits/sample\nheard 'seven' 9{i}%" for i in range(3)]
    img = metrics.figure_spectrograms(clips, 16000, labels, title="3 tones")
    assert contains_text(img, "3 tones", 2)
    for i in range(3):
        assert contains_text(img, f"#{i}: 2.{i}0 bits/sample") and contains_text(img, f"heard 'seven' 9{i}%")
    for text in ("-80 dB", "0 dB", "0.5", "8", "x: time (s); y: frequency (kHz)"):
        assert contains_text(img, text), text
    assert contains_text(img, "frequency (kHz, mel scale)", vertical=True)
    # the figure's tiles are spectrogram_grid's tiles
    tiles = metrics.spectrogram_tiles(clips, 16000)
    assert any((img[y:y + 48, x:x + 129] == tiles[0]).all() for y in range(40, 70) for x in range(45, 55))


def test_figures_command_draws_learning_curves_from_the_log(tmp_path):
    pf, train = pytest.importorskip("pf"), pytest.importorskip("train")
    cfg = pf.Config(pooling=(2,), layers=(1, 1), d_model=8, d_rnn=64)
    params = jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    train.save_checkpoint(str(tmp_path / "best.npz"), {"ema": params}, {"model": dataclasses.asdict(cfg), "step": 30})
    records = [{"step": s, "loss_bits": 8 - s / 10} for s in (10, 20, 30)] + \
              [{"step": 30, "val_nll_bits": 5.5, "test_nll_bits": 5.6}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics.main(["figures", "--checkpoint", str(tmp_path)])
    from test_metrics import read_png
    img = read_png(str(tmp_path / "curves.png"))
    for text in ("training loss (batch)", "validation NLL (EMA)", "test NLL (EMA)", "training step"):
        assert contains_text(img, text), text
    assert contains_text(img, "bits per sample", vertical=True)
