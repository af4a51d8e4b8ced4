"""Tests for metrics.py: each formula against an independent computation, the mel front end against
the Slaney mel formula and librosa's values, the PNG writer, checkpoints, the classifier's training."""
import dataclasses
import json
import math
import os
import re
import shutil
import wave

import jax
import matplotlib.image
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from hypothesis import given, settings, strategies as st

import data
import metrics


def rand_probs(seed, n, k, sharpness=1.0):
    logits = np.random.default_rng(seed).normal(size=(n, k)) * sharpness
    return metrics.softmax64(logits)


# ---------------------------------------------------------------- FID

def fid_reference(a, b):
    """SaShiMi's recipe: scipy.linalg.sqrtm of the covariance product."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = scipy.linalg.sqrtm(s_a @ s_b)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * np.real(covmean)))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(12, 60), f=st.integers(1, 8),
       shift=st.floats(-3, 3), scale=st.floats(0.2, 3))
def test_fid_matches_scipy_sqrtm(seed, n, f, shift, scale):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, f)) @ rng.normal(size=(f, f))
    b = rng.normal(size=(n + 7, f)) * scale + shift
    got, want = metrics.fid(a, b), fid_reference(a, b)
    assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), f'fid {got} vs scipy {want}'


def test_fid_extremes_and_mean_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-8)
    c = rng.normal(size=16)
    assert metrics.fid(x, x + c) == pytest.approx(np.sum(c ** 2), rel=1e-9)   # same covariance
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations
    a, b = rng.normal(size=(500, 1)), rng.normal(size=(400, 1)) * 3 + 2
    want = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert metrics.fid(a, b) == pytest.approx(want, rel=1e-9)


def test_fid_rejects_nan_features_and_fewer_than_two_clips():
    x = np.ones((5, 3))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match='NaN'):
        metrics.fid(x, np.ones((5, 3)))
    # one clip has no covariance (its unbiased estimate divides by N - 1 = 0): refused, not a NaN FID
    with pytest.raises(ValueError, match=re.escape('expected (N >= 2, F), got shape (1, 3)')):
        metrics.gaussian_stats(np.ones((1, 3)))
    mu, sigma = metrics.gaussian_stats(np.array([[0.0, 1.0], [2.0, 5.0]]))  # two clips: the least it takes
    np.testing.assert_allclose(mu, [1.0, 3.0])
    np.testing.assert_allclose(sigma, [[2.0, 4.0], [4.0, 8.0]])


# ---------------------------------------------------------------- IS, mIS, AM by direct loops

def kl_loop(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def is_loop(probs):
    n, k = probs.shape
    marginal = [sum(probs[i][j] for i in range(n)) / n for j in range(k)]
    return math.exp(sum(kl_loop(probs[i], marginal) for i in range(n)) / n)


def mis_loop(probs):
    n = len(probs)
    return math.exp(sum(kl_loop(probs[i], probs[j]) for i in range(n) for j in range(n)) / n ** 2)


def am_loop(probs_train, probs_gen):
    k = probs_train.shape[1]
    mean_t = [sum(p[j] for p in probs_train) / len(probs_train) for j in range(k)]
    mean_g = [sum(p[j] for p in probs_gen) / len(probs_gen) for j in range(k)]
    entropy = sum(-sum(pj * math.log(pj) for pj in p if pj > 0) for p in probs_gen) / len(probs_gen)
    return kl_loop(mean_t, mean_g) + entropy


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 25), k=st.integers(2, 12),
       sharpness=st.floats(0.1, 8))
def test_scores_match_direct_loops(seed, n, k, sharpness):
    p = rand_probs(seed, n, k, sharpness)
    q = rand_probs(seed + 1, n + 3, k, sharpness)
    assert metrics.inception_score(p) == pytest.approx(is_loop(p), rel=1e-9)
    assert metrics.modified_inception_score(p) == pytest.approx(mis_loop(p), rel=1e-9)
    assert metrics.am_score(q, p) == pytest.approx(am_loop(q, p), rel=1e-9, abs=1e-12)
    assert 1 - 1e-9 <= metrics.inception_score(p) <= k + 1e-9


def test_score_extremes():
    k = 10
    confident_spread = np.eye(k)[np.arange(50) % k]
    assert metrics.inception_score(confident_spread) == pytest.approx(k)
    constant = np.tile(rand_probs(0, 1, k), (50, 1))
    assert metrics.inception_score(constant) == pytest.approx(1.0)
    assert metrics.modified_inception_score(constant) == pytest.approx(1.0)
    assert metrics.am_score(confident_spread, confident_spread) == pytest.approx(0.0, abs=1e-12)
    # uniform predictions: nothing learnt, AM = entropy = log K
    assert metrics.am_score(confident_spread, np.full((7, k), 1 / k)) == pytest.approx(math.log(k))
    # one-hot predictions of different classes have infinite pairwise KL: mIS is infinite, as it should be
    assert metrics.modified_inception_score(confident_spread) == math.inf
    # a generator that never hears a digit the training clips hold: KL(p_train(y) || p_gen(y)) is infinite
    never_nine = np.eye(k)[np.arange(50) % (k - 1)]
    assert metrics.am_score(confident_spread, never_nine) == math.inf
    heard = np.bincount(np.arange(50) % (k - 1)) / 50  # the other way round: finite, the 0 log 0 terms 0
    assert metrics.am_score(never_nine, confident_spread) == pytest.approx(sum(h * math.log(h * k) for h in heard))


def test_scores_reject_bad_probabilities():
    p = rand_probs(0, 4, 3)
    p[1, 1] = np.nan
    with pytest.raises(ValueError, match='NaN'):
        metrics.inception_score(p)
    with pytest.raises(ValueError, match='probability'):
        metrics.am_score(np.ones((3, 3)), rand_probs(1, 3, 3))


# ---------------------------------------------------------------- mel front end

def slaney_mel(f):
    """Slaney's Auditory Toolbox mel scale, written out: 3 f / 200 below 1 kHz, then
    15 + 27 ln(f / 1000) / ln 6.4."""
    return 3 * f / 200 if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)


def slaney_hz(m):
    return 200 * m / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)


def test_mel_scale_and_filterbank_against_formula():
    for f in (0.0, 200.0, 999.0, 1000.0, 2500.0, 8000.0):
        assert metrics.hz_to_mel(f) == pytest.approx(slaney_mel(f), abs=1e-9)
        assert metrics.mel_to_hz(slaney_mel(f)) == pytest.approx(f, abs=1e-6)
    fb = metrics.mel_filterbank(16000, 2048, 32)
    assert fb.shape == (32, 1025)
    top = slaney_mel(8000)
    centers = [slaney_hz(top * (i + 1) / 33) for i in range(32)]
    bin_hz = 16000 / 2048
    # each filter peaks at the FFT bin nearest its centre (the peak may straddle two bins)
    for i, c in enumerate(centers):
        assert abs(np.argmax(fb[i]) * bin_hz - c) <= bin_hz
    # norm='slaney': every triangle has unit area in Hz (checked on bands many bins wide)
    widths = [slaney_hz(top * (i + 2) / 33) - slaney_hz(top * i / 33) for i in range(32)]
    for i in range(32):
        if widths[i] > 20 * bin_hz:
            assert fb[i].sum() * bin_hz == pytest.approx(1.0, rel=0.02)


@settings(max_examples=30, deadline=None)
@given(band=st.integers(0, 31), offset=st.floats(-0.3, 0.3), amp=st.floats(0.01, 1.0),
       phase=st.floats(0, 6.28))
def test_pure_tone_lands_in_its_mel_band(band, offset, amp, phase):
    top = slaney_mel(8000)
    spacing = top / 33
    f = slaney_hz(spacing * (band + 1 + offset))     # band's centre, up to 0.3 bands off
    t = np.arange(16000) / 16000
    image = metrics.mel_features((amp * np.sin(2 * np.pi * f * t + phase))[None])[0]   # (M, T)
    assert image.shape == (32, 32)
    got = int(np.argmax(image[:, 2:-2].mean(1)))      # away from the reflect-padded edges
    assert got == band, f'{f:.1f} Hz: loudest band {got}, expected {band}'


def test_mel_features_shapes_range_and_length_fix():
    rng = np.random.default_rng(0)
    speechlike = rng.normal(size=(3, 20000)).astype(np.float32) * np.linspace(0, 1, 20000) ** 3
    feats = metrics.mel_features(speechlike)
    assert feats.shape == (3, 32, 32) and feats.dtype == np.float32
    assert np.allclose(feats.max(axis=(1, 2)), 0.0, atol=1e-4)      # dB relative to the clip's maximum
    assert feats.min() >= -80.0 - 1e-4
    # longer clips are cut, shorter ones zero-padded to 16000 samples
    np.testing.assert_array_equal(feats, metrics.mel_features(speechlike[:, :16000]))
    short = speechlike[:, :7000]
    np.testing.assert_array_equal(metrics.mel_features(short),
                                  metrics.mel_features(np.pad(short, ((0, 0), (0, 9000)))))
    # a quiet tone after silence uses the full 80 dB range; silence is 0 dB everywhere (ref = max = floor)
    tone = np.concatenate([np.zeros(8000), 0.3 * np.sin(np.arange(8000) * 0.5)])[None]
    img = metrics.mel_features(tone)[0]
    assert img.min() == pytest.approx(-80.0) and img.max() == pytest.approx(0.0, abs=1e-4)
    np.testing.assert_allclose(metrics.mel_features(np.zeros((1, 16000))), 0.0, atol=1e-5)
    # one bad sample in one clip of three is refused, not scored: a NaN would turn its image to NaN
    for bad in (np.nan, np.inf):
        clips = speechlike.copy()
        clips[1, 5000] = bad
        with pytest.raises(ValueError, match='NaN or inf'):
            metrics.mel_features(clips)


# librosa 0.11: power_to_db(melspectrogram(y, sr=16000, n_mels=32, pad_mode='reflect'), ref=np.max),
# computed once outside this project (which uses no audio library).
LIBROSA_TONES_FRAME_0 = [
    -20.775, -19.637, -17.605, -5.818, -0.475, -15.174, -23.806, -28.445, -31.982, -34.991, -37.803,
    -40.622, -43.729, -47.439, -52.51, -61.173, -58.465, -51.215, -46.479, -42.133, -36.439, -15.607,
    -14.557, -34.934, -40.692, -44.089, -46.598, -48.59, -50.206, -51.499, -52.476, -53.107]
LIBROSA_TONES_FRAME_20 = [
    -80, -80, -75.426, -6.403, 0, -48.156, -80, -80, -80, -80, -80, -80, -80, -80, -80, -80, -80, -80,
    -80, -80, -80, -15.535, -14.48, -80, -80, -80, -36.755, -27.492, -34.288, -80, -80, -80]
LIBROSA_CHIRP_BAND_20 = [
    -63.326, -69.347, -80, -80, -80, -80, -80, -80, -80, -80, -60.847, -27.397, -16.215, -13.513,
    -17.541, -29.897, -65.395, -80, -58.817, -55.948, -65.821, -80, -80, -80, -80, -80, -80, -80, -80,
    -80, -80, -80]


def test_mel_features_match_librosa_values():
    t = np.arange(16000) / 16000
    tones = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)
             + 0.05 * np.sin(2 * np.pi * (50 * t + 3900 * t ** 2)))
    chirp = (np.sin(2 * np.pi * (100 * t + 3000 * t ** 2)) * np.exp(-3 * t))[:9600]  # 0.6 s, zero-padded
    img_tones, img_chirp = metrics.mel_features(np.stack([tones, np.pad(chirp, (0, 6400))]).astype(np.float32))
    for got, want in ((img_tones[:, 0], LIBROSA_TONES_FRAME_0), (img_tones[:, 20], LIBROSA_TONES_FRAME_20),
                      (img_chirp[20, :], LIBROSA_CHIRP_BAND_20)):
        diff = np.abs(got - np.array(want))
        assert diff.max() < 5e-3, f'largest difference from librosa {diff.max():.4f} dB'


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    params = {'stem': {'w': rng.normal(size=(3, 3, 2, 8)).astype(np.float32), 'b': np.zeros(8, np.float32)},
              'blocks': [{'conv1': {'w': rng.normal(size=(3, 3, 8, 8)).astype(np.float32)}},
                         {'shortcut': {'w': rng.normal(size=(1, 1, 8, 16)).astype(np.float32)}}]
              + [{'gain': np.full(2, i, np.float32)} for i in range(2, 12)],  # 12 entries: '10' sorts before '2'
              'head': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}}
    path = str(tmp_path / 'params.npz')
    metrics.save_params_npz(path, params)
    with np.load(path, allow_pickle=False) as f:
        assert 'blocks/1/shortcut/w' in f.files
    loaded = metrics.load_params_npz(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(path + '.tmp')


# ---------------------------------------------------------------- classifier

def tone_set(n, seed):
    """Three classes of 1 s clips: a tone at 300, 1000 or 3000 Hz, random phase and onset."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    t = np.arange(16000) / 16000
    freqs = np.array([300.0, 1000.0, 3000.0])[labels]
    audio = np.sin(2 * np.pi * freqs[:, None] * t + rng.uniform(0, 6, (n, 1)))
    audio *= (t[None, :] > rng.uniform(0, 0.5, (n, 1)))
    return audio.astype(np.float32), labels


def test_classifier_loss_decreases_in_a_few_steps():
    audio, labels = tone_set(48, 0)
    params = metrics.classifier_init(jax.random.key(0), widths=(8, 16), n_classes=3)
    optimizer = metrics.make_optimizer(lr=1e-2, steps=30)
    train_step = metrics.make_train_step(optimizer, augment=True)
    opt_state = optimizer.init(params)
    losses = []
    for step in range(30):
        idx = np.arange(16) + 16 * (step % 3)
        params, opt_state, loss, _ = train_step(params, opt_state, jax.random.key(step), audio[idx], labels[idx])
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), f'losses {losses}'
    images = metrics.mel_features(audio)
    feats, probs = metrics.classify(params, images)
    assert feats.shape == (48, 32) and probs.shape == (48, 3)   # mean | max pooled 16 channels
    assert np.allclose(probs.sum(1), 1.0)
    # each clip's own: the same features alone (with 255 padding rows), or among the others reversed
    alone, reversed_ = metrics.classify(params, images[:1])[0], metrics.classify(params, images[::-1])[0]
    np.testing.assert_allclose(alone, feats[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reversed_[::-1], feats, rtol=1e-5, atol=1e-6)


def test_train_classifier_keeps_the_parameters_of_its_best_validation_accuracy(monkeypatch):
    """train_classifier returns the parameters it had at its best validation accuracy (scripted here:
    0.5, 0.9, 0.3 at steps 1, 2, 3), with that step and accuracy, not the last step's."""
    audio, labels = tone_set(12, 0)
    seen, script = [], iter([0.5, 0.9, 0.3])  # (step 1's lr is 0, warmup: seen[0] is also the init)
    monkeypatch.setattr(metrics, 'accuracy', lambda params, images, labels_: seen.append(params) or next(script))
    keys, real = [], metrics.make_train_step

    def make_train_step(optimizer):  # records each step's key: the augmentation and masks are drawn from it
        step = real(optimizer)
        return lambda params, opt_state, key, *batch: keys.append(jax.random.key_data(key)) or step(
            params, opt_state, key, *batch)
    monkeypatch.setattr(metrics, 'make_train_step', make_train_step)
    params, info = metrics.train_classifier(jax.random.key(0), audio, labels, None, None, steps=3, batch=4,
                                            eval_every=1, widths=(8,), log=lambda line: None)
    assert info == {'best_step': 2, 'val_acc': 0.9} and len(seen) == 3
    # each step draws fresh augmentation from a key of its own: fold_in(the steps' key, s), as the shipped one was made
    k_steps = jax.random.split(jax.random.key(0))[1]
    np.testing.assert_array_equal(np.stack(keys), np.stack([jax.random.key_data(jax.random.fold_in(k_steps, s))
                                                            for s in (1, 2, 3)]))
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert same(params, seen[1]) and not same(params, seen[2]) and not same(params, seen[0])


def test_the_classifiers_second_channel_is_the_mel_bands_position():
    """The band channel varies along the mel axis, not along time. With every kernel symmetric in time
    and in frequency, and one stage (stride 1: SAME pads both sides alike), reversing an image in time
    leaves a clip's features unchanged, and reversing it in frequency changes them: the band channel is
    not reversed with the image. A channel laid along time would give the opposite."""
    def symmetric(w):  # a kernel (HWIO: H is frequency, W time) made symmetric in both
        w = (w + w[:, ::-1]) / 2
        return (w + w[::-1]) / 2
    params = metrics.classifier_init(jax.random.key(1), widths=(8,), n_classes=3)
    params = jax.tree.map(lambda x: symmetric(x) if x.ndim == 4 else x, params)
    images = np.random.default_rng(0).uniform(-80, 0, (4, 32, 32)).astype(np.float32)  # (clip, band, frame)
    feats = metrics.classify(params, images)[0]
    np.testing.assert_allclose(metrics.classify(params, images[:, :, ::-1])[0], feats, rtol=1e-5, atol=1e-5)
    assert np.abs(metrics.classify(params, images[:, ::-1, :])[0] - feats).max() > 1e-2


def test_augmentation_keeps_length_and_shifts_in_time():
    audio = np.zeros(16000, np.float32)
    audio[8000] = 1.0
    outs = np.stack([np.asarray(metrics.augment_audio(jax.random.key(i), audio)) for i in range(20)])
    assert outs.shape == (20, 16000) and np.isfinite(outs).all()
    peaks = np.abs(outs).argmax(1)
    assert np.all(np.abs(peaks - 8000) <= metrics.MAX_SHIFT) and len(set(peaks)) > 1


def test_mask_image_sets_one_band_and_one_frame_range_to_the_floor():
    """On an image with no value at the floor: what changed is exactly a run of at most 4 whole bands
    (rows) and a run of at most 4 whole frames (columns), set to -80 dB; across keys, both happen."""
    image = np.random.default_rng(0).uniform(-79, 0, (32, 32)).astype(np.float32)
    widths = []
    for seed in range(20):
        out = np.asarray(metrics.mask_image(jax.random.key(seed), image, max_width=4))
        changed = out != image
        assert (out[changed] == -80.0).all()
        rows, cols = np.flatnonzero(changed.all(1)), np.flatnonzero(changed.all(0))
        expected = np.zeros_like(changed)
        expected[rows], expected[:, cols] = True, True
        assert (changed == expected).all(), f'key {seed}: not whole bands and frames'
        for run in (rows, cols):
            assert len(run) <= 4 and (len(run) == 0 or run[-1] - run[0] == len(run) - 1)
        widths.append((len(rows), len(cols)))
    assert max(w for w, _ in widths) > 0 and max(w for _, w in widths) > 0, widths
    # over many keys the widths are 0 to max_width, each end reached (0: no mask at all); never wider
    keys = jax.random.split(jax.random.key(99), 300)
    out = np.asarray(jax.vmap(lambda k: metrics.mask_image(k, image, max_width=4))(keys))
    bands, frames = (out == -80.0).all(2).sum(1), (out == -80.0).all(1).sum(1)  # whole rows, whole columns
    assert set(bands.tolist()) == set(frames.tolist()) == {0, 1, 2, 3, 4}, (sorted(set(bands)), sorted(set(frames)))


# ---------------------------------------------------------------- scores() and `metrics.py evaluate`

@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
    """A data folder holding the 'tiny' built-in set (200 clips), built once for this file."""
    data = pytest.importorskip('data')
    d = str(tmp_path_factory.mktemp('data'))
    data.load('sc09-espeak', data_dir=d, size='tiny')
    return d


def sound_set(n, seed):
    """n one-second clips: a tone between 200 Hz and 4 kHz plus some noise, varied enough that an
    untrained classifier with a random head gives varied, non-uniform predictions."""
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    f = rng.uniform(200, 4000, (n, 1))
    return (0.5 * np.sin(2 * np.pi * f * t) + rng.uniform(0, 0.3, (n, 1)) * rng.normal(size=(n, 16000))).astype(np.float32) / 2


@pytest.fixture(scope='module')
def classifier_and_stats():
    """A small untrained classifier (widths 4, 8: 16 features, fewer than the clips, so the
    covariances are full rank) with a random head on standardised features, so that its predictions
    vary from clip to clip; and the training statistics of 32 clips, with their features and
    probabilities."""
    params = metrics.classifier_init(jax.random.key(0), widths=(4, 8), n_classes=10)
    images = metrics.mel_features(sound_set(32, 0))
    feats = metrics.classify(params, images)[0]
    w = np.random.default_rng(0).normal(size=params['head']['w'].shape) / feats.std(0)[:, None] / 2
    params['head'] = {'w': jax.numpy.asarray(w, np.float32), 'b': jax.numpy.asarray(-feats.mean(0) @ w, np.float32)}
    feats, probs = metrics.classify(params, images)
    stats = {'mu': feats.mean(0), 'sigma': np.cov(feats, rowvar=False), 'mean_probs': probs.mean(0)}
    return params, stats, feats, probs


def assert_scores_match_loops(got, params, train_feats, train_probs, audio):
    feats, probs = metrics.classify(params, metrics.mel_features(audio))
    assert got['n'] == len(audio)
    assert got['am'] == pytest.approx(am_loop(train_probs, probs), rel=1e-9)
    assert got['is'] == pytest.approx(is_loop(probs), rel=1e-9)
    assert got['mis'] == pytest.approx(mis_loop(probs), rel=1e-9)
    assert got['fid'] == pytest.approx(fid_reference(train_feats, feats), rel=1e-6)


def test_scores_of_clips_match_the_loop_references(classifier_and_stats):
    """scores(): AM (its own formula, against the training statistics' mean prediction), IS, mIS by
    direct loops and FID by scipy's sqrtm, on predictions far from uniform."""
    params, stats, train_feats, train_probs = classifier_and_stats
    audio = sound_set(24, 1)
    probs = metrics.classify(params, metrics.mel_features(audio))[1]
    assert probs.max(1).mean() > 0.3 and metrics.inception_score(probs) > 1.5  # varied, not uniform
    assert_scores_match_loops(metrics.scores(params, stats, audio), params, train_feats, train_probs, audio)


def test_evaluate_command_prints_the_table_and_writes_metrics_json_with_the_test_nll(classifier_and_stats, tiny_data_dir,
                                                                                     tmp_path, capsys):
    """`metrics.py evaluate` end to end: WAVs in a folder, a classifier folder, a train.py checkpoint.
    The scores are those of the WAVs as the stdlib wave module reads them; the NLL column is the
    checkpoint's EMA model on the whole test split, computed here from pf.apply's logits."""
    pf, train = pytest.importorskip('pf'), pytest.importorskip('train')
    data = pytest.importorskip('data')
    params, stats, train_feats, train_probs = classifier_and_stats
    reference = {'n': 20, 'fid': 1.5, 'is': 2.5, 'mis': 3.5, 'am': 0.25}
    metrics.save_classifier(str(tmp_path / 'classifier'), params,
                            {'dataset': 'sc09-espeak', 'test_accuracy': 0.5,
                             'reference_scores': {'held-out test clips': reference}}, stats)
    samples = tmp_path / 'samples'
    samples.mkdir()
    for i, clip in enumerate(sound_set(6, 2)):
        clip[:4000] *= 0.03  # a quiet first quarter: the rest is loud, for the voiced share
        data.write_wav(samples / f'sample_{i:03d}.wav', clip)
    clips = []
    for i in range(6):
        with wave.open(str(samples / f'sample_{i:03d}.wav')) as w:
            clips.append(np.frombuffer(w.readframes(w.getnframes()), '<i2') / 32768)
    # a train.py checkpoint of a tiny model trained on the tiny built-in set, 160-token rows
    cfg = pf.Config(pooling=(2,), layers=(1, 1), d_model=16, d_rnn=64, dropout=0.0)
    rng = np.random.default_rng(2)
    model = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.2).astype(s.dtype),
                         jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg)))
    meta = {'model': dataclasses.asdict(cfg), 'step': 5, 'epoch': 0, 'best_val': None,
            'train': {'data_dir': tiny_data_dir, 'size': 'tiny', 'seq_len': 160, 'path': None, 'microbatch': None,
                      'batch_size': 8},
            'data': {'name': 'sc09-espeak', 'encoding': 'mu-law', 'sample_rate': 16000, 'seq_len': 160}}
    (tmp_path / 'run').mkdir()
    train.save_checkpoint(str(tmp_path / 'run' / 'best.npz'), {'ema': model}, meta)
    test = data.load('sc09-espeak', tiny_data_dir, 'tiny', seq_len=160).test
    logits = np.asarray(jax.jit(pf.apply, static_argnames='cfg')(model, np.asarray(test.tokens, np.int32), cfg), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    real = np.arange(160) < test.lengths[:, None]
    token_logp = np.take_along_axis(logp, test.tokens[..., None].astype(int), -1)[..., 0]
    nll = -token_logp[real].mean() / math.log(2)

    metrics.main(['evaluate', '--samples', str(samples), '--checkpoint', str(tmp_path / 'run'),
                  '--classifier', str(tmp_path / 'classifier')])
    with open(samples / 'metrics.json') as f:
        written = json.load(f)
    assert written['nll'] == pytest.approx(nll, abs=1e-4)
    assert_scores_match_loops(written, params, train_feats, train_probs, np.stack(clips))
    assert written['reference'] == reference
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if 'Test NLL' in line)
    row = lines[header + 2].split()
    assert row[:2] == ['samples', '(n=6)'] and float(row[2]) == pytest.approx(nll, abs=1e-3)
    assert written['floor_drift_db'] == pytest.approx(metrics.noise_floor_drift(clips), abs=1e-9)
    assert written['voiced'] == pytest.approx(metrics.voiced_share(clips), abs=1e-9) and written['voiced'] is not None
    keys = ('fid', 'is', 'mis', 'am', 'floor_drift_db')
    assert [float(v) for v in row[3:-1]] == pytest.approx([written[k] for k in keys], abs=0.05)
    assert float(row[-1]) == pytest.approx(100 * written['voiced'], abs=0.5)  # voiced %
    assert lines[header + 3].split()[:4] == ['sc09-espeak', 'test', 'clips', '(n=20)']
    # `frames` reads the same model's bits per token (rows of 160 tokens: no whole 25 ms frame after two)
    bits, split, _ = metrics.model_token_bits(str(tmp_path / 'run'), None)
    assert len(split) == len(test) and bits[real].mean() == pytest.approx(nll, abs=1e-4)
    metrics.main(['frames', '--checkpoint', str(tmp_path / 'run'), '--clips', '3', '--per-clip'])
    table = capsys.readouterr().out
    assert 'the first 3 test clips' in table and table.splitlines()[-2].split()[-3:] == ['0', '-', '-']
    by_offset = metrics.nll_by_offset(bits[:3], split.lengths[:3], 2)
    assert table.splitlines()[-1].endswith(f'0: {by_offset[0]:.2f}, 1: {by_offset[1]:.2f}')
    assert [line.split(':')[0] for line in table.splitlines() if line.startswith('test clip')] == \
        ['test clip 0', 'test clip 0', 'test clip 1', 'test clip 1', 'test clip 2', 'test clip 2']
    assert lines[header + 3].split()[-2:] == ['-', '-']  # this reference has no drift or voiced figure


def test_noise_floor_drift_measures_how_far_the_floor_moves_within_a_clip():
    """noise_floor_drift: the 10th-percentile level of 25 ms frames, last quarter against first, the
    median over clips. A constant floor under a loud word does not drift; a floor that steps from -40
    to -20 dB halfway drifts 20 dB, as does one that climbs by quarters (-40, -30, -30, -20 dB), whose
    halves' floors differ by only 10; a short clip has its own quarters; a clip under 4 frames gives None."""
    rng = np.random.default_rng(0)
    noise = lambda n, db: rng.normal(size=n) * 10 ** (db / 20)
    steady = noise(16000, -40)
    steady[11000:14000] += 0.5 * np.sin(np.arange(3000) * 0.3)  # the word, in the last quarter
    stepped = np.concatenate([noise(8000, -40), noise(8000, -20)])
    assert metrics.noise_floor_drift([steady]) < 0.5
    assert metrics.noise_floor_drift([stepped]) == pytest.approx(20, abs=0.5)
    assert metrics.noise_floor_drift([stepped[::-1]]) == pytest.approx(20, abs=0.5)  # down counts as up
    ramp = np.concatenate([noise(4000, -40), noise(8000, -30), noise(4000, -20)])  # quarters at -40, -30, -30, -20
    assert metrics.noise_floor_drift([ramp]) == pytest.approx(20, abs=1.0)  # halves' floors would be 10 dB apart
    short = np.concatenate([noise(3200, -30), noise(3200, -36)])  # 16 frames: quarters of 4
    assert metrics.noise_floor_drift([short]) == pytest.approx(6, abs=0.6)
    assert metrics.noise_floor_drift([steady, stepped, stepped]) == pytest.approx(20, abs=0.5)  # the median
    assert metrics.noise_floor_drift([steady, noise(1599, -30)]) is None


def test_periodicity_finds_a_pitch_period_and_not_noise():
    """periodicity: the best normalised autocorrelation of a 50 ms frame at lags of 2.5-12.5 ms, against
    each lag's correlation written out. A vowel-like frame (a 125 Hz pulse train ringing a 700 Hz resonance) and a
    200 Hz sine score ~1; white noise and the built-in set's darkest noise (low-passed at 300 Hz) do not
    reach VOICED_PEAK; a 50 Hz wave (a period of 320 samples, out of range), close to itself at the short
    lags, is not taken for a pitch: the search starts past the first zero crossing."""
    rng = np.random.default_rng(0)
    n = metrics.VOICE_FRAME
    pulses = np.zeros(n + 800)
    pulses[::128] = 1.0
    vowel = np.zeros_like(pulses)  # a resonator: poles at 0.97 e^(+-i 2 pi 700/16000)
    a1, a2 = 2 * 0.97 * np.cos(2 * np.pi * 700 / 16000), -0.97 ** 2
    for t in range(len(pulses)):
        vowel[t] = pulses[t] + a1 * vowel[t - 1] + a2 * vowel[t - 2] if t >= 2 else pulses[t]
    vowel = vowel[800:]
    t = np.arange(n)
    slow = np.sin(2 * np.pi * t / 320) + 0.1 * rng.normal(size=n)  # 50 Hz: close at lag 40, not periodic there
    pulses200 = np.exp(-(t % 200) / 3.0)  # an 80 Hz pulse train: its best lag is the last one, 200
    for frame in (vowel, 3.0 * vowel + 0.5, rng.normal(size=n), rng.normal(size=n) + np.sin(2 * np.pi * t / 80), slow,
                  pulses200):
        x = frame - frame.mean()
        r = {k: np.dot(x[:-k], x[k:]) / np.linalg.norm(x[:-k]) / np.linalg.norm(x[k:]) for k in range(1, 201)}
        first_negative = min(k for k in r if r[k] < 0)
        brute = max(r[k] for k in r if k >= max(40, first_negative))
        assert metrics.periodicity(frame) == pytest.approx(brute, abs=1e-9)
    assert metrics.periodicity(vowel) > 0.95 and metrics.periodicity(np.sin(2 * np.pi * t / 80)) > 0.99
    assert metrics.periodicity(pulses200) > 0.99
    x = slow - slow.mean()
    assert np.dot(x[:-40], x[40:]) / np.linalg.norm(x[:-40]) / np.linalg.norm(x[40:]) > 0.65  # close at lag 40
    assert metrics.periodicity(slow) < metrics.VOICED_PEAK
    with pytest.raises(ValueError, match='too short'):
        metrics.periodicity(vowel[:399])
    # (0.27% of dark frames reach VOICED_PEAK (metrics.voiced_share); these 40, of this seed, do not)
    dark = data._lowpass(rng.normal(size=40 * n), 300.0).reshape(40, n)
    white = rng.normal(size=(40, n))
    assert max(metrics.periodicity(f) for f in np.concatenate([dark, white])) < metrics.VOICED_PEAK


def test_voiced_share_counts_the_periodic_loud_frames():
    """voiced_share: over all clips, the share of frames > 15 dB above their clip's floor that are
    periodic. A clip with a quiet floor, 10 frames of a vowel-like tone and 10 of loud noise: 1/2; the
    floor's frames are not counted; two clips pool their frames; no loud frame gives None."""
    rng = np.random.default_rng(1)
    n = metrics.VOICE_FRAME
    t = np.arange(10 * n)
    tone = 0.3 * np.sign(np.sin(2 * np.pi * t / 100)) * np.exp(-(t % 100) / 20)  # a pulse every 100 samples
    floor = lambda frames: 1e-3 * rng.normal(size=frames * n)
    clip = np.concatenate([floor(20), tone, 0.3 * rng.normal(size=10 * n)])
    assert metrics.voiced_share([clip]) == 0.5
    assert metrics.voiced_share([np.concatenate([floor(20), tone])]) == 1.0
    assert metrics.voiced_share([clip, np.concatenate([floor(20), tone])]) == pytest.approx(20 / 30)
    assert metrics.voiced_share([floor(20)]) is None
    # a partial last frame is left out, a clip under one frame skipped, digital silence is not the floor
    assert metrics.voiced_share([np.concatenate([clip, 0.3 * rng.normal(size=n - 1)]), tone[:n - 1]]) == 0.5
    assert metrics.voiced_share([np.concatenate([np.zeros(20 * n), floor(20), tone])]) == 1.0


def test_mu_law_edges_are_where_the_encoder_moves_to_the_next_token():
    edges = metrics.mu_law_edges()
    assert edges[0] == -np.inf and edges[-1] == np.inf and edges[128] == 0
    assert (data.mu_law_encode(edges[1:-1] + 1e-9) == np.arange(1, 256)).all()
    assert (data.mu_law_encode(edges[1:-1] - 1e-9) == np.arange(0, 255)).all()


def quantised_gaussian_entropy(sigma):
    """Entropy in bits of the mu-law token of N(0, sigma) amplitudes, from scipy's normal CDF on the
    token edges written out from data.mu_law_encode's rule (an independent reference)."""
    y = np.clip((np.arange(257) - 0.005) / 255.99 * 2 - 1, -1, 1)
    x = np.sign(y) * (256.0 ** np.abs(y) - 1) / 255
    mass = np.diff(scipy.stats.norm.cdf(np.r_[-np.inf, x[1:-1], np.inf] / sigma))
    return float(-np.sum(mass[mass > 0] * np.log2(mass[mass > 0])))


def test_linear_predictor_costs_the_entropy_of_white_noise_and_less_for_a_resonance():
    """lpc_bits on white noise: no tap helps, so its bits equal the entropy of the noise's tokens (plus
    the cost of fitting 16 taps on 400 samples). On a resonance (an AR(2) process with the same power,
    driven by noise 7.8x weaker) it saves about log2(7.8) = 3 bits: it predicts from the past."""
    rng = np.random.default_rng(0)
    sigma, n = 0.05, 16000
    white = data.mu_law_encode(rng.normal(0, sigma, n))
    bits = metrics.lpc_bits(white)
    assert np.isnan(bits[:800]).all() and not np.isnan(bits[800:]).any()  # the first two frames: no fit
    entropy = quantised_gaussian_entropy(sigma)
    assert entropy < np.mean(bits[800:]) < entropy + 0.1, (np.mean(bits[800:]), entropy)
    r, w = 0.86, 2 * np.pi * 300 / 16000  # poles r e^(+-iw): a gain of 7.8
    a1, a2 = 2 * r * np.cos(w), -r * r
    gain = np.sqrt((1 - a2) / ((1 + a2) * ((1 - a2) ** 2 - a1 ** 2)))  # std of the process per unit drive
    e, x = rng.normal(0, 1, n + 4000), np.zeros(n + 4000)
    for t in range(2, len(x)):
        x[t] = a1 * x[t - 1] + a2 * x[t - 2] + e[t]
    x = x[4000:] / gain * sigma  # the same power as the white noise
    assert np.std(x) == pytest.approx(sigma, rel=0.2)
    saved = np.mean(bits[800:]) - np.mean(metrics.lpc_bits(data.mu_law_encode(x))[800:])
    assert abs(saved - np.log2(gain)) < 0.3, (saved, np.log2(gain))


def test_the_reference_bits_take_a_clips_uint8_tokens_up_to_255():
    """Every clip a dataset yields is min-max scaled, so its uint8 tokens reach 0 and 255: the Gaussian
    token bits of 0 and 255 are the mass below the second edge and above the last but one (NumPy's
    int64 indices give the same), and lpc_bits has a finite cost for every predicted token."""
    tokens = data.encode(np.random.default_rng(2).normal(0, 0.05, 16000), 'mu-law')
    assert tokens.dtype == np.uint8 and tokens.min() == 0 and tokens.max() == 255
    edges = metrics.mu_law_edges()
    ends = metrics.gaussian_token_bits(np.array([0, 255], np.uint8), 0.0, 0.5)
    tail = scipy.stats.norm.cdf(edges[1] / 0.5), scipy.stats.norm.sf(edges[255] / 0.5)
    np.testing.assert_allclose(ends, -np.log2(0.999 * np.array(tail) + 0.001 / 256), rtol=1e-9)
    np.testing.assert_array_equal(ends, metrics.gaussian_token_bits(np.array([0, 255], np.int64), 0.0, 0.5))
    assert np.isfinite(metrics.lpc_bits(tokens)[800:]).all()  # the first two frames: no fit


def test_a_splits_padded_rows_reach_the_classifier_as_digital_silence():
    """_split_audio (what train-classifier and evaluate score): each row's real tokens decoded, and its
    padding exactly 0.0 (token 128 decodes to 8.6e-5, not 0)."""
    tokens = np.random.default_rng(5).integers(0, 256, (2, 16000)).astype(np.uint8)
    tokens[1, 9000:] = data.SILENCE
    audio = metrics._split_audio(data.Split(tokens, np.array([16000, 9000], np.int32), np.array([3, 4])), 'mu-law')
    np.testing.assert_array_equal(audio[:, :9000], data.mu_law_decode(tokens[:, :9000]))
    assert (audio[1, 9000:] == 0.0).all() and (audio[0, 9000:] == data.mu_law_decode(tokens[0, 9000:])).all()


def test_nll_by_offset_counts_offsets_from_the_up_pools_shift():
    """Pooling by 4: up_pool shifts by 3, so position 3 is offset 0 (its pooled step has seen every
    token before it), position 4 offset 1, ...; padded positions are left out."""
    bits = np.tile([10.0, 20.0, 30.0, 40.0], 3)[None]  # position t costs 10 (t mod 4 + 1)
    assert metrics.nll_by_offset(bits, [12], 4) == [40.0, 10.0, 20.0, 30.0]
    bits[0, 10:] = 1000.0  # padding
    assert metrics.nll_by_offset(bits, [10], 4) == [40.0, 10.0, 20.0, 30.0]
    assert metrics.nll_by_offset(np.arange(6.0)[None], [6], 2) == [3.0, 2.0]  # offset 0 at 1, 3, 5


def test_frame_nll_splits_loud_frames_from_noise_floor_frames():
    """A clip of 40 frames: a -40 dB floor with a tone 30 dB louder in frames 20-29. A stand-in model
    costs 1 bit per token in the floor and 5 in the tone: frame_nll finds 10 loud frames at 5 bits and
    28 floor frames at 1 bit (the first two frames have no linear prediction and are left out)."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.01, 16000)
    x[8000:12000] += 0.3 * np.sin(np.arange(4000) * 0.2)
    tokens = data.mu_law_encode(x)
    model_bits = np.where((np.arange(16000) >= 8000) & (np.arange(16000) < 12000), 5.0, 1.0)
    result = metrics.frame_nll(model_bits[None], tokens[None], [16000])
    assert result['loud'][:2] == (10, 5.0) and result['floor'][:2] == (28, 1.0)
    lpc = metrics.lpc_bits(tokens)
    assert result['floor'][2] == pytest.approx(np.mean(np.r_[lpc[800:8000], lpc[12000:]]))
    assert result['loud'][2] < result['floor'][2] - 2  # a tone is far easier to predict than noise
    # the same clip as a padded row of 24,000 (silence, and bits the padding never earns): the same frames
    padded = metrics.frame_nll(np.r_[model_bits, np.full(8000, 99.0)][None],
                               np.r_[tokens, np.full(8000, data.SILENCE, np.uint8)][None], [16000])
    assert padded == result

# ---------------------------------------------------------------- figures

def rglru(lam, theta=None):
    return {'gate_a': {'w': np.zeros(1)}, 'lambda_': lam, **({} if theta is None else {'theta': theta})}


def test_rglru_a_values_in_depth_order_and_figures():
    """A pf.py-shaped tree: SkipBlock 'before' -> 'inner' -> 'after', stacks of L layers on axis 0."""
    def stack(mags, phase):
        lam = np.log(np.array(mags) / (1 - np.array(mags)))[:, None] * np.ones((1, 4))   # (L, N)
        return {'temporal': {'branch': {'rglru': rglru(lam, np.full_like(lam, phase))}}, 'mlp': {}}
    params = {'head': {'w': np.zeros(2)},
              'skip_block': {'after': stack([0.5, 0.6], 0.3), 'before': stack([0.1, 0.2], 0.1),
                             'down_pool': {}, 'up_pool': {},
                             'inner': {'layers': stack([0.3, 0.4], 0.2)}}}
    a_values = metrics.rglru_a_values(params)
    assert [p for p, _ in a_values] == [
        'skip_block/before/temporal/branch/rglru[0]', 'skip_block/before/temporal/branch/rglru[1]',
        'skip_block/inner/layers/temporal/branch/rglru[0]', 'skip_block/inner/layers/temporal/branch/rglru[1]',
        'skip_block/after/temporal/branch/rglru[0]', 'skip_block/after/temporal/branch/rglru[1]']
    np.testing.assert_allclose([np.abs(a).mean() for _, a in a_values], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    np.testing.assert_allclose(np.angle(a_values[2][1]), 0.2)
    real = metrics.rglru_a_values({'x': rglru(np.array([0.0, 0.0]))})
    np.testing.assert_allclose(real[0][1], [0.5, 0.5])

    _, numbers = metrics.figure_mean_abs_a(a_values)
    np.testing.assert_allclose(numbers['mean_abs_a'], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    _, numbers = metrics.figure_complex_plane(a_values)
    np.testing.assert_allclose(numbers['real'][0], 0.1 * np.cos(0.1))


def test_figures_command_reads_a_train_checkpoint(tmp_path):
    """figures on a train.py checkpoint (EMA weights): one mean |a| per RG-LRU layer in network order
    (SkipBlock: layers before the pooling, the deeper level, layers after), PNG + JSON beside it."""
    pf, train = pytest.importorskip('pf'), pytest.importorskip('train')
    cfg = pf.Config(pooling=(2,), layers=(1, 2), d_model=8, d_rnn=64)
    template = jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), template)
    train.save_checkpoint(str(tmp_path / 'best.npz'), {'ema': params}, {'model': dataclasses.asdict(cfg), 'step': 7})
    metrics.main(['figures', '--checkpoint', str(tmp_path)])
    sb = params['skip_block']
    lams = [sb['before']['temporal']['branch']['rglru']['lambda_'][0],
            *sb['inner']['layers']['temporal']['branch']['rglru']['lambda_'],
            sb['after']['temporal']['branch']['rglru']['lambda_'][0]]
    with open(tmp_path / 'fig4_9_mean_abs_a.json') as f:
        got = json.load(f)['mean_abs_a']
    np.testing.assert_allclose(got, [np.mean(1 / (1 + np.exp(-np.float64(l)))) for l in lams], rtol=1e-6)
    for name in ('fig4_7_a_complex_plane', 'fig4_9_mean_abs_a'):
        assert matplotlib.image.imread(str(tmp_path / f'{name}.png')).shape[2] == 4


@pytest.mark.parametrize('ring,mean_abs_a', [('small', 0.945), ('circle', 0.660)])
def test_figures_init_draws_a_fresh_baseline_from_the_requested_ring(ring, mean_abs_a, tmp_path):
    """`figures --init RING` (thesis Figure 4.7's left column): a freshly initialised baseline, its |a| drawn
    as sqrt(U[min^2, max^2]). Its mean, E sqrt(U) = 2/3 (max^3 - min^3) / (max^2 - min^2), is 0.945 for the
    small ring's [0.9, 0.99] and 0.660 for the circle's [0.01, 0.99]. The mean of each of the 36 layers'
    128 values is within 0.1 of it (5 standard errors of the circle's), their mean within 0.02 (6)."""
    metrics.main(['figures', '--init', ring, '--out', str(tmp_path)])
    with open(tmp_path / 'fig4_9_mean_abs_a.json') as f:
        got = json.load(f)
    assert got['source'] == f'init ring={ring}' and len(got['mean_abs_a']) == 36  # 4 levels x (4 + 4) + 4 deepest
    np.testing.assert_allclose(got['mean_abs_a'], mean_abs_a, atol=0.1)
    assert abs(np.mean(got['mean_abs_a']) - mean_abs_a) < 0.02


# ---------------------------------------------------------------- sanity on the built-in digits

def test_train_classifier_command_selects_on_validation_and_keeps_training_set_statistics(tiny_data_dir, tmp_path,
                                                                                          monkeypatch):
    """`metrics.py train-classifier`, its training stubbed (one fixed classifier): it is trained on the
    training split's decoded audio and selected on the validation split's images; the FID / AM reference
    statistics it saves are those of the training split's features; its held-out row (FID, voiced %, floor
    drift) and its test accuracy are the test split's. Without --out it writes DATA_DIR/classifier-DATASET,
    the folder every command looks in first."""
    data_dir = str(tmp_path / 'data')  # a copy: the classifier is written into it (its cache, keyed by the
    shutil.copytree(tiny_data_dir, data_dir)  # folder's path, is rebuilt from the WAVs once)
    ds = data.load('sc09-espeak', data_dir=data_dir, size='tiny')
    audio = lambda split: np.where(np.arange(16000) < split.lengths[:, None], data.decode(split.tokens, ds.encoding),
                                   0.0).astype(np.float32)  # each clip's decoded tokens, its padding silent
    params, seen = metrics.classifier_init(jax.random.key(0), n_classes=10), {}

    def fake_train(key, train_audio, train_labels, val_images, val_labels, **kw):
        seen.update(train_audio=train_audio, train_labels=train_labels, val_images=val_images, val_labels=val_labels)
        return params, {'best_step': 1, 'val_acc': 0.5}
    monkeypatch.setattr(metrics, 'train_classifier', fake_train)
    real_accuracy, scored = metrics.accuracy, []

    def accuracy(params, images, labels):  # the test accuracy's inputs, as train-classifier reports it
        scored.append((np.asarray(images), np.asarray(labels), real_accuracy(params, images, labels)))
        return scored[-1][-1]
    monkeypatch.setattr(metrics, 'accuracy', accuracy)
    command = ['train-classifier', '--dataset', 'sc09-espeak', '--size', 'tiny', '--data-dir', data_dir, '--steps', '1']
    metrics.main(command)
    out = os.path.join(data_dir, 'classifier-sc09-espeak')
    np.testing.assert_array_equal(seen['train_audio'], audio(ds.train))
    np.testing.assert_array_equal(seen['val_images'], metrics.mel_features(audio(ds.validation)))
    np.testing.assert_array_equal(seen['val_labels'], ds.validation.labels)
    _, config, stats = metrics.load_classifier(out)
    feats, probs = metrics.classify(params, metrics.mel_features(audio(ds.train)))
    np.testing.assert_allclose(stats['mu'], feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats['mean_probs'], probs.mean(0), rtol=1e-5)
    held_out = metrics.scores(params, stats, audio(ds.test))
    row = config['reference_scores']['held-out test clips']
    assert abs(row['fid'] - held_out['fid']) < 1e-6 * (1 + held_out['fid'])
    clips = lambda split: [a[:n] for a, n in zip(data.decode(split.tokens, ds.encoding), split.lengths)]  # cut, not padded
    voiced, drift = metrics.voiced_share(clips(ds.test)), metrics.noise_floor_drift(clips(ds.test))
    assert (row['voiced'], row['floor_drift_db']) == (pytest.approx(voiced), pytest.approx(drift))
    assert abs(metrics.voiced_share(clips(ds.validation)) - voiced) > 0.1  # another split's clips would show (0.62 vs 0.28)
    # (the stub classifier calls every clip one digit, and both splits hold each digit twice: the accuracy
    # itself cannot tell the splits apart, so the images it was measured on are compared)
    (images, labels, acc), = scored
    np.testing.assert_array_equal(images, metrics.mel_features(audio(ds.test)))
    np.testing.assert_array_equal(labels, ds.test.labels)
    assert config['test_accuracy'] == acc
    # and a classifier trained into DATA_DIR is the one every command uses, before the shipped one
    assert metrics.find_classifier('sc09-espeak', data_dir) == out
    assert metrics.find_classifier('sc09-espeak', str(tmp_path / 'nothing')) == os.path.join(
        metrics.SHIPPED_CLASSIFIERS, 'sc09-espeak')
    assert metrics.find_classifier('sc09', str(tmp_path / 'nothing')) is None
    # one cut short before its last file (config.json and train_stats.npz) is passed over for the shipped one
    half = tmp_path / 'half' / 'classifier-sc09-espeak'
    os.makedirs(half)
    shutil.copy(os.path.join(out, 'params.npz'), half)
    assert metrics.find_classifier('sc09-espeak', str(tmp_path / 'half')) == os.path.join(
        metrics.SHIPPED_CLASSIFIERS, 'sc09-espeak')
    # --out puts it there instead, leaving DATA_DIR's as it was
    written, elsewhere = os.path.getmtime(os.path.join(out, 'params.npz')), str(tmp_path / 'cls')
    metrics.main(command + ['--out', elsewhere])
    timeless = lambda c: {k: v for k, v in c.items() if k != 'train_seconds'}
    assert timeless(metrics.load_classifier(elsewhere)[1]) == timeless(config)
    assert os.path.getmtime(os.path.join(out, 'params.npz')) == written


def test_tiny_classifier_ranks_held_out_digits_above_noise_and_silence(tiny_data_dir):
    """Issue item 3 in miniature (the full-size numbers are in the README): a classifier trained
    briefly on the 'tiny' built-in set (160 clips) already scores its held-out clips far better than
    white noise or silence: lower FID, higher IS, lower AM."""
    data = pytest.importorskip('data')
    ds = data.load('sc09-espeak', data_dir=tiny_data_dir, size='tiny')
    train, val, test = (metrics._split_audio(s, ds.encoding) for s in (ds.train, ds.validation, ds.test))
    params, info = metrics.train_classifier(jax.random.key(0), train, ds.train.labels,
                                            metrics.mel_features(val), ds.validation.labels,
                                            steps=250, batch=32, lr=3e-3, eval_every=125, widths=(8, 16, 32))
    feats, probs = metrics.classify(params, metrics.mel_features(train))
    mu, sigma = metrics.gaussian_stats(feats)
    stats = {'mu': mu, 'sigma': sigma, 'mean_probs': probs.mean(0)}
    rng = np.random.default_rng(0)
    held_out = metrics.scores(params, stats, test)
    noise = metrics.scores(params, stats, rng.uniform(-1, 1, (len(test), 16000)))
    silence = metrics.scores(params, stats, np.zeros((len(test), 16000)))
    print(f'tiny: test accuracy {metrics.accuracy(params, metrics.mel_features(test), ds.test.labels)}, '
          f'held-out {held_out}, noise {noise}, silence {silence}')
    assert metrics.accuracy(params, metrics.mel_features(test), ds.test.labels) >= 0.5
    for bad in (noise, silence):
        assert held_out['fid'] < bad['fid'] / 5
        assert held_out['is'] > 1.5 and bad['is'] < 1.2
        assert held_out['am'] < bad['am']


def test_compare_runs_reads_equal_minutes_and_equal_steps(tmp_path):
    """`metrics.py compare`: validation NLL at each run's end and at the last evaluation step every run
    reached; parameters counted from the saved config; median tokens/s; the report's FID and IS."""
    import pf
    models = {"pooled": {"pooling": [2], "layers": [1, 1], "d_model": 32, "d_rnn": 64},
              "flat": {"pooling": [], "layers": [3], "d_model": 32, "d_rnn": 64}}
    logs = {"pooled": [(10, 1.0, 9e4), (20, 2.0, 1e5), (30, 3.0, 2e5)], "flat": [(10, 1.5, 3e4), (20, 3.0, 4e4)]}
    evals = {"pooled": {10: 6.0, 20: 5.5, 30: 5.2}, "flat": {10: 6.4, 20: 6.1}}
    for name, model in models.items():
        run = tmp_path / name
        (run / "samples").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"model": model, "train": {}}))
        rows = [{"step": s, "minutes": m, "loss_bits": 6.0, "tokens_per_s": t} for s, m, t in logs[name]]
        rows += [{"step": s, "val_nll_bits": v, "test_nll_bits": v + 0.1} for s, v in evals[name].items()]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "samples" / "metrics.json").write_text(json.dumps({"fid": 400.0 + len(name), "is": 1.5}))
    pooled, flat = metrics.compare_runs([str(tmp_path / "pooled"), str(tmp_path / "flat")])
    for r, name in ((pooled, "pooled"), (flat, "flat")):
        cfg = pf.Config(**models[name])
        assert r["params"] == pf.count_params(jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg)))
        assert r["fid"] == 400.0 + len(name) and r["is"] == 1.5
    assert (pooled["steps"], flat["steps"]) == (30, 20) and (pooled["minutes"], flat["minutes"]) == (3.0, 3.0)
    assert (pooled["tokens_per_s"], flat["tokens_per_s"]) == (1e5, 4e4)  # the medians
    assert (pooled["val_end"], flat["val_end"]) == (5.2, 6.1)
    assert pooled["equal_step"] == flat["equal_step"] == 20
    assert (pooled["val_equal_steps"], flat["val_equal_steps"]) == (5.5, 6.1)
    with pytest.raises(SystemExit, match="not a train.py run folder"):
        metrics.compare_runs([str(tmp_path)])


@pytest.mark.parametrize('case', ['one_wav', 'rate_8k', 'no_params', 'clips_0', 'sc09_run'])
def test_bad_input_to_evaluate_and_frames_ends_in_an_error_line_naming_it(case, tmp_path):
    """Each refused before any score is computed: a single clip (no covariance), 8 kHz clips (the
    classifier hears 16 kHz), a --classifier folder without params.npz, frames --clips 0, and an SC09
    run's samples with no SC09 classifier (without --dataset, the run's own dataset picks the
    classifier: the built-in digits' shipped one would score them in another's units)."""
    samples = tmp_path / 'samples'
    samples.mkdir()
    rate = 8000 if case == 'rate_8k' else 16000
    for i in range(1 if case == 'one_wav' else 2):
        data.write_wav(samples / f'{i}.wav', np.zeros(rate), rate)
    (tmp_path / 'empty').mkdir()
    if case == 'sc09_run':
        pf, checkpoint = pytest.importorskip('pf'), pytest.importorskip('checkpoint')
        cfg = pf.Config(pooling=(2,), layers=(1, 1), d_model=16, d_rnn=64)
        ema = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg)))
        (tmp_path / 'run').mkdir()
        checkpoint.save_checkpoint(str(tmp_path / 'run' / 'best.npz'), {'ema': ema},
                                   {'model': dataclasses.asdict(cfg), 'data': {'name': 'sc09'}})
    argv, words = {
        'one_wav': (['evaluate', '--samples', str(samples)], 'need at least 2 .wav files, found 1'),
        'rate_8k': (['evaluate', '--samples', str(samples)], '8000 Hz, the classifier needs 16000 Hz'),
        'no_params': (['evaluate', '--samples', str(samples), '--classifier', str(tmp_path / 'empty')],
                      f'no digit classifier in {tmp_path / "empty"}'),
        'clips_0': (['frames', '--checkpoint', str(tmp_path), '--clips', '0'], '--clips 0 must be >= 1'),
        'sc09_run': (['evaluate', '--samples', str(samples), '--checkpoint', str(tmp_path / 'run'),
                      '--data-dir', str(tmp_path)], f'no digit classifier in {tmp_path / "classifier-sc09"}'),
    }[case]
    with pytest.raises(SystemExit) as e:
        metrics.main(argv)
    assert str(e.value).startswith('error: ') and words in str(e.value), str(e.value)
