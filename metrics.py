"""Metrics for Poolformer (thesis sec. 2.2, table 4.5) and the thesis' analysis figures.

    python metrics.py train-classifier --dataset sc09-espeak     # digit classifier -> data/classifier-sc09-espeak/
    python metrics.py evaluate --samples DIR [--checkpoint MODEL] # table 4.5 row: NLL, FID, IS, mIS, AM
    python metrics.py figures --checkpoint RUN                    # figures 4.7, 4.9 (+ JSON) and curves.png
    python metrics.py frames --checkpoint RUN                     # NLL in speech and noise against a linear predictor

The perceptual metrics follow SaShiMi's SC09 evaluation (state-spaces/s4, sashimi/sc09_classifier):
a digit classifier reads a 32 x 32 mel image of each clip; FID compares its penultimate (pooled)
features of the samples with those of the training set, IS / mIS / AM use its softmax. SaShiMi used a
pretrained ResNeXt; ours is a small ResNet trained here in pure JAX, so absolute values differ.

  FID = |mu_g - mu_d|^2 + Tr(S_g + S_d - 2 (S_d S_g)^(1/2))
  IS  = exp E_x KL(p(y|x) || p(y))            mIS = exp E_{x,x'} KL(p(y|x) || p(y|x'))
  AM  = KL(p_train(y) || p_gen(y)) + E_x H(p(y|x))

Notation: N clips, S samples per clip, T frames, M mel bands, C channels, K classes.
Everything here is NumPy or functional JAX; figures are matplotlib's (off-screen, Agg).
"""
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure  # off-screen figures (the Agg canvas); no pyplot, no display

import checkpoint
import data
import pf

# ----------------------------------------------------------------------------------------------
# Mel front end, as SaShiMi's classifier sees audio (librosa defaults of its time)

SAMPLE_RATE = 16000   # the classifier's rate (Hz)
CLIP_SAMPLES = 16000  # clips are padded with zeros or cut to one second
N_FFT = 2048          # STFT frame length
HOP = 512             # STFT hop; centred frames give 1 + 16000 // 512 = 32 frames
N_MELS = 32           # Slaney mel bands
AMIN = 1e-10          # power floor of power_to_db
TOP_DB = 80.0         # dynamic range kept below the clip's maximum


def hz_to_mel(f):
    """Slaney's mel scale (librosa htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    f_sp = 200.0 / 3                      # Hz per mel in the linear part
    min_log_mel = 1000.0 / f_sp           # 15 mel at 1 kHz
    logstep = np.log(6.4) / 27.0
    log_part = min_log_mel + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep
    return np.where(f >= 1000.0, log_part, f / f_sp)


def mel_to_hz(m):
    """Inverse of hz_to_mel."""
    m = np.asarray(m, np.float64)
    f_sp = 200.0 / 3
    min_log_mel = 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, 1000.0 * np.exp(logstep * (m - min_log_mel)), m * f_sp)


def mel_filterbank(sample_rate, n_fft, n_mels):
    """(M, n_fft // 2 + 1) triangular filters between 0 Hz and Nyquist, equally spaced in Slaney
    mels, each scaled by 2 / (its width in Hz) (norm='slaney': every triangle has unit area in Hz)."""
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))  # (M + 2,)
    widths = np.diff(edges_hz)                                                      # (M + 1,)
    ramps = edges_hz[:, None] - fft_hz[None, :]                                     # (M + 2, bins)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))                          # (M, bins)
    return weights * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]


def hann_window(n):
    """Periodic Hann window (scipy get_window('hann', n, fftbins=True), librosa's default)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def power_spectrogram(audio, n_fft, hop):
    """|STFT|^2 with centred frames: (N, S) -> (N, 1 + S // hop, n_fft // 2 + 1).
    The signal is reflect-padded by n_fft // 2 on both sides (librosa center=True, pad_mode='reflect',
    its default until 0.10 and the one SaShiMi's classifier was trained with)."""
    padded = jnp.pad(audio, ((0, 0), (n_fft // 2, n_fft // 2)), mode='reflect')
    n_frames = 1 + audio.shape[-1] // hop
    index = hop * np.arange(n_frames)[:, None] + np.arange(n_fft)[None, :]          # (T, n_fft)
    frames = padded[:, index] * jnp.asarray(hann_window(n_fft), audio.dtype)        # (N, T, n_fft)
    return jnp.abs(jnp.fft.rfft(frames, axis=-1)) ** 2


def power_to_db(power):
    """dB relative to each clip's maximum, floored at AMIN and cut TOP_DB below the top:
    (N, ...) -> (N, ...) with values in [-TOP_DB, 0] (librosa power_to_db(ref=np.max))."""
    db = 10.0 * jnp.log10(jnp.maximum(power, AMIN))
    db = db - jnp.max(db, axis=tuple(range(1, power.ndim)), keepdims=True)  # log is monotonic: ref = max
    return jnp.maximum(db, -TOP_DB)


def mel_db(audio, sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop=HOP, n_mels=N_MELS):
    """Mel power spectrogram in dB: (N, S) float -> (N, M, T), bands low to high (JAX, jittable)."""
    fbank = jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels), jnp.float32)   # (M, bins)
    power = power_spectrogram(audio.astype(jnp.float32), n_fft, hop)                # (N, T, bins)
    return power_to_db(jnp.einsum('mf,ntf->nmt', fbank, power))                     # (N, M, T)


_mel_db_jit = jax.jit(mel_db, static_argnames=('sample_rate', 'n_fft', 'hop', 'n_mels'))


def fit_length(audio, length=CLIP_SAMPLES):
    """Pad with zeros at the end or cut: (N, S) -> (N, length)."""
    audio = np.asarray(audio, np.float32)
    if audio.shape[1] >= length:
        return audio[:, :length]
    return np.pad(audio, ((0, 0), (0, length - audio.shape[1])))


def mel_features(audio, batch=256):
    """The classifier's input: float audio (N, S) at 16 kHz -> (N, 32, 32) float32 dB images
    (mel band x frame), padded or cut to 16000 samples first."""
    audio = fit_length(np.atleast_2d(audio))
    if not np.isfinite(audio).all():
        raise ValueError('mel_features: audio contains NaN or inf')
    out = [np.asarray(_mel_db_jit(jnp.asarray(audio[i:i + batch])))
           for i in range(0, len(audio), batch)]
    return np.concatenate(out) if out else np.zeros((0, N_MELS, 1 + CLIP_SAMPLES // HOP), np.float32)


# ----------------------------------------------------------------------------------------------
# The formulas (NumPy, float64)

def _check_probs(probs, name='probs'):
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f'{name}: expected a non-empty (N, K) array, got shape {p.shape}')
    if not np.isfinite(p).all():
        raise ValueError(f'{name}: contains NaN or inf')
    if (p < 0).any() or np.abs(p.sum(1) - 1).max() > 1e-3:
        raise ValueError(f'{name}: rows must be probability vectors (>= 0, summing to 1)')
    return p


def _xlogy(x, y):
    """x log y with 0 log y = 0 (so that one-hot rows are fine); y = 0 < x gives -inf."""
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.where(x > 0, x * np.log(np.where(x > 0, y, 1.0)), 0.0)


def _kl(p, q):
    """KL(p || q) along the last axis, in nats."""
    return (_xlogy(p, p) - _xlogy(p, q)).sum(-1)


def _entropy(p):
    return -_xlogy(p, p).sum(-1)


def inception_score(probs):
    """IS = exp E_x KL(p(y|x) || p(y)), p(y) the mean prediction over the same samples.
    (SaShiMi's script scored half the samples against the other half's mean; for large N the two
    agree.) 1 <= IS <= K."""
    p = _check_probs(probs)
    return float(np.exp(_kl(p, p.mean(0)).mean()))


def modified_inception_score(probs):
    """mIS = exp E_{x,x'} KL(p(y|x) || p(y|x')), exactly over all N^2 ordered pairs (x = x' included,
    as SaShiMi's pairs drawn with replacement). Uses
    E_{x,x'} KL = -E_x H(p(y|x)) - sum_k p(k) E_x' log p(k|x')."""
    p = _check_probs(probs)
    with np.errstate(divide='ignore'):
        mean_log = np.log(p).mean(0)                                # (K,), may be -inf
    cross = np.where(p.mean(0) > 0, p.mean(0) * mean_log, 0.0).sum()
    return float(np.exp(-_entropy(p).mean() - cross))


def am_score(probs_train, probs_gen):
    """AM = KL(p_train(y) || p_gen(y)) + E_x H(p_gen(y|x)); 0 is best."""
    pt = _check_probs(probs_train, 'probs_train')
    pg = _check_probs(probs_gen, 'probs_gen')
    return float(_kl(pt.mean(0), pg.mean(0)) + _entropy(pg).mean())


def gaussian_stats(feats):
    """Mean and unbiased covariance of (N, F) features (N >= 2)."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f'features: expected (N >= 2, F), got shape {f.shape}')
    if not np.isfinite(f).all():
        raise ValueError('features: contain NaN or inf')
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu_d, sigma_d, mu_g, sigma_g):
    """|mu_g - mu_d|^2 + Tr(S_d + S_g) - 2 Tr((S_d S_g)^(1/2)), with
    Tr((S_d S_g)^(1/2)) = Tr((S_d^(1/2) S_g S_d^(1/2))^(1/2)) = sum sqrt(eig) of a symmetric PSD matrix."""
    w, v = np.linalg.eigh(sigma_d)
    sqrt_d = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = sqrt_d @ sigma_g @ sqrt_d
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    d = np.sum((mu_g - mu_d) ** 2) + np.trace(sigma_d) + np.trace(sigma_g) - 2 * tr_covmean
    return float(max(d, 0.0))  # only rounding can make it negative


def fid(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two (N, F) feature sets."""
    return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


# ----------------------------------------------------------------------------------------------
# The digit classifier: a small pre-activation ResNet on the 32 x 32 dB image (NHWC)

def conv_init(key, k, c_in, c_out):
    w = jax.random.normal(key, (k, k, c_in, c_out)) * math.sqrt(2.0 / (k * k * c_in))  # He normal
    return {'w': w, 'b': jnp.zeros(c_out)}


def conv(params, x, stride=1):
    """'SAME' 2-D convolution: (B, H, W, C_in) -> (B, H / stride, W / stride, C_out)."""
    y = jax.lax.conv_general_dilated(x, params['w'], (stride, stride), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + params['b']


def group_norm_init(c):
    return {'scale': jnp.ones(c), 'bias': jnp.zeros(c)}


def group_norm(params, x, groups=4, eps=1e-5):
    """Normalise each clip over (H, W, C / groups) per group (no batch statistics to carry)."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)                       # (B, H, W, G, C/G)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + eps)
    return g.reshape(b, h, w, c) * params['scale'] + params['bias']


def dense(params, x):
    return x @ params['w'] + params['b']


def res_block_init(key, c_in, c_out):
    """Two 3x3 convs; a block that changes width also halves H and W and gets a 1x1 shortcut."""
    k1, k2, k3 = jax.random.split(key, 3)
    p = {'norm1': group_norm_init(c_in), 'conv1': conv_init(k1, 3, c_in, c_out),
         'norm2': group_norm_init(c_out), 'conv2': conv_init(k2, 3, c_out, c_out)}
    if c_in != c_out:
        p['shortcut'] = conv_init(k3, 1, c_in, c_out)
    return p


def res_block(params, x):
    stride = 2 if 'shortcut' in params else 1
    y = conv(params['conv1'], jax.nn.relu(group_norm(params['norm1'], x)), stride)
    y = conv(params['conv2'], jax.nn.relu(group_norm(params['norm2'], y)))
    skip = conv(params['shortcut'], x, stride) if 'shortcut' in params else x
    return skip + y


def classifier_init(key, widths=(16, 32, 64), blocks_per_stage=1, n_classes=10):
    """Stem conv -> stages of ResBlocks (32x32 -> 16x16 -> 8x8) -> norm -> mean and max pool -> dense."""
    keys = iter(jax.random.split(key, 2 + len(widths) * blocks_per_stage))
    blocks, c = [], widths[0]
    for width in widths:
        for _ in range(blocks_per_stage):
            blocks.append(res_block_init(next(keys), c, width))
            c = width
    return {'stem': conv_init(next(keys), 3, 2, widths[0]), 'blocks': blocks,
            'head_norm': group_norm_init(c),
            'head': {'w': jnp.zeros((2 * c, n_classes)), 'b': jnp.zeros(n_classes)}}  # starts at log K


def classifier_features(params, images):
    """Penultimate features (the pooled activations FID uses): (B, M, T) dB images -> (B, 2C)."""
    x = (images + TOP_DB / 2) / (TOP_DB / 2)                          # [-80, 0] dB -> [-1, 1]; (B, M, T)
    # A second channel holds the band's position (-1 lowest, 1 highest): convolutions and pooling are
    # shift invariant, and without it the network could not tell a low tone from a high one.
    band = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, x.shape[1])[None, :, None], x.shape)
    x = jnp.stack([x, band], axis=-1)                                 # (B, M, T, 2)
    x = conv(params['stem'], x)
    for block in params['blocks']:
        x = res_block(block, x)
    x = jax.nn.relu(group_norm(params['head_norm'], x))
    return jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)  # (B, 2C): mean | max pool


def classifier(params, images):
    """(B, M, T) dB images -> (features (B, 2C), logits (B, K))."""
    feats = classifier_features(params, images)
    return feats, dense(params['head'], feats)


_classifier_jit = jax.jit(classifier)


def softmax64(logits):
    """Softmax in float64 so that confident predictions keep their tiny probabilities (mIS reads them)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def classify(params, images, batch=256):
    """(N, M, T) images -> (features (N, C) float64, probs (N, K) float64). Raises on NaN."""
    feats, logits = [], []
    for i in range(0, len(images), batch):
        chunk = np.asarray(images[i:i + batch], np.float32)
        n = len(chunk)
        chunk = np.pad(chunk, ((0, batch - n), (0, 0), (0, 0)))       # one compiled shape
        f, l = _classifier_jit(params, jnp.asarray(chunk))
        feats.append(np.asarray(f[:n], np.float64))
        logits.append(np.asarray(l[:n], np.float64))
    feats, logits = np.concatenate(feats), np.concatenate(logits)
    if not (np.isfinite(feats).all() and np.isfinite(logits).all()):
        raise ValueError('classifier produced NaN or inf (corrupt checkpoint or input?)')
    return feats, softmax64(logits)


# ----------------------------------------------------------------------------------------------
# Training the classifier: augmentation on the audio and on the image, AdamW, best validation accuracy

MAX_SHIFT = SAMPLE_RATE // 5  # time shift up to 0.2 s either way (SaShiMi's classifier used the same)


def augment_audio(key, audio):
    """One clip (S,) -> (S,): random time shift, gain, mixed-in low-pass 'background' noise and white
    noise, each applied with probability 1/2."""
    k = jax.random.split(key, 9)
    s = audio.shape[0]
    shift = jax.random.randint(k[0], (), -MAX_SHIFT, MAX_SHIFT + 1)
    shifted = jax.lax.dynamic_slice(jnp.pad(audio, MAX_SHIFT), (MAX_SHIFT - shift,), (s,))
    audio = jnp.where(jax.random.bernoulli(k[1]), shifted, audio)
    audio = audio * jnp.where(jax.random.bernoulli(k[2]), jax.random.uniform(k[3], (), minval=0.7, maxval=1.1), 1.0)
    brown = jnp.cumsum(jax.random.normal(k[4], (s,)))                # random walk: energy at low frequencies
    brown = brown - jnp.linspace(0.0, 1.0, s) * brown[-1]            # the end pinned to 0, the start one step from it
    brown = brown / (jnp.max(jnp.abs(brown)) + 1e-6)
    mix = jnp.where(jax.random.bernoulli(k[5]), jax.random.uniform(k[6], (), maxval=0.15), 0.0)
    audio = audio * (1 - mix) + brown * mix
    level = jnp.where(jax.random.bernoulli(k[7]), 10.0 ** jax.random.uniform(k[8], (), minval=-4.0, maxval=-1.5), 0.0)
    return audio + level * jax.random.normal(jax.random.fold_in(key, 1), (s,))


def mask_image(key, image, max_width=4):
    """SpecAugment: one band mask and one frame mask, up to max_width wide, set to the floor (-80 dB)."""
    k = jax.random.split(key, 4)
    m, t = image.shape
    f0 = jax.random.randint(k[0], (), 0, m)
    fw = jax.random.randint(k[1], (), 0, max_width + 1)
    t0 = jax.random.randint(k[2], (), 0, t)
    tw = jax.random.randint(k[3], (), 0, max_width + 1)
    band = (jnp.arange(m) >= f0) & (jnp.arange(m) < f0 + fw)
    frame = (jnp.arange(t) >= t0) & (jnp.arange(t) < t0 + tw)
    return jnp.where(band[:, None] | frame[None, :], -TOP_DB, image)


def classifier_loss(params, images, labels):
    _, logits = classifier(params, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_optimizer(lr=3e-3, steps=1000, weight_decay=1e-4):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps, lr / 30)
    return optax.adamw(schedule, weight_decay=weight_decay)


def make_train_step(optimizer, augment=True):
    """Returns jitted train_step(params, opt_state, key, audio (B, 16000), labels (B,))
    -> (params, opt_state, loss, accuracy). The front end runs inside the step, after augmentation."""
    def train_step(params, opt_state, key, audio, labels):
        k_audio, k_image = jax.random.split(key)
        if augment:
            audio = jax.vmap(augment_audio)(jax.random.split(k_audio, len(audio)), audio)
        images = mel_db(audio)
        if augment:
            images = jax.vmap(mask_image)(jax.random.split(k_image, len(images)), images)
        (loss, acc), grads = jax.value_and_grad(classifier_loss, has_aux=True)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc
    return jax.jit(train_step)


def accuracy(params, images, labels):
    _, probs = classify(params, images)
    return float(np.mean(probs.argmax(1) == np.asarray(labels)))


def train_classifier(key, train_audio, train_labels, val_images, val_labels, steps=1000, batch=64,
                     lr=3e-3, eval_every=100, widths=(16, 32, 64), log=print):
    """Train on (N, 16000) audio with augmentation; keep the parameters with the best validation
    accuracy. Returns (params, info dict)."""
    k_init, k_steps = jax.random.split(key)
    params = classifier_init(k_init, widths=widths, n_classes=int(np.max(train_labels)) + 1)
    optimizer = make_optimizer(lr, steps)
    opt_state = optimizer.init(params)
    train_step = make_train_step(optimizer)
    rng = np.random.default_rng(int(jax.random.randint(k_init, (), 0, 2**31 - 1)))
    best = {'val_acc': -1.0, 'step': 0, 'params': params}
    train_seconds, t_start = 0.0, None
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(train_audio), batch)
        params, opt_state, loss, acc = train_step(params, opt_state, jax.random.fold_in(k_steps, step),
                                                  jnp.asarray(train_audio[idx]), jnp.asarray(train_labels[idx]))
        loss = float(loss)                                             # syncs the device
        if not np.isfinite(loss):
            raise FloatingPointError(f'classifier loss is NaN/inf at step {step}')
        if step == 1:
            t_start = time.perf_counter()                              # exclude compilation
        if step % eval_every == 0 or step == steps:
            train_seconds += time.perf_counter() - t_start              # exclude evaluation
            val_acc = accuracy(params, val_images, val_labels)
            if val_acc > best['val_acc']:
                best = {'val_acc': val_acc, 'step': step, 'params': params}
            log(f'step {step} | loss {loss:.3f} | batch acc {float(acc):.3f} | val acc {val_acc:.4f} | '
                f'{1000 * train_seconds / max(step - 1, 1):.0f} ms/step')
            t_start = time.perf_counter()
    return best['params'], {'best_step': best['step'], 'val_acc': best['val_acc']}


# ----------------------------------------------------------------------------------------------
# Checkpoints: arrays keyed by '/'-joined tree path in an .npz, plus JSON; written atomically

def flatten_params(tree, prefix=''):
    """Nested dicts / lists -> {'a/b/0/w': array}."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: np.asarray(tree)}
    flat = {}
    for k, v in items:
        flat.update(flatten_params(v, f'{prefix}/{k}' if prefix else str(k)))
    return flat


def unflatten_params(flat):
    """{'a/b/0/w': array} -> nested dicts; a dict whose keys are exactly '0'..'n-1' becomes a list."""
    root = {}
    for path, value in flat.items():
        node = root
        *parents, leaf = path.split('/')
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and sorted(node) == sorted(str(i) for i in range(len(node))):
            return [node[str(i)] for i in range(len(node))]
        return node
    return listify(root)


def load_params_npz(path):
    """An .npz of '/'-joined tree paths -> nested dict of jnp arrays (never unpickles)."""
    with np.load(path, allow_pickle=False) as f:
        return jax.tree.map(jnp.asarray, unflatten_params({k: f[k] for k in f.files}))


def save_params_npz(path, params):
    data.write_atomic(path, lambda f: np.savez(f, **flatten_params(jax.device_get(params))))


def save_json(path, obj):
    data.write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + '\n').encode()))


def save_classifier(out_dir, params, config, train_stats):
    """out_dir/params.npz, out_dir/train_stats.npz (FID / AM reference statistics), out_dir/config.json."""
    os.makedirs(out_dir, exist_ok=True)
    save_params_npz(os.path.join(out_dir, 'params.npz'), params)
    data.write_atomic(os.path.join(out_dir, 'train_stats.npz'), lambda f: np.savez(f, **train_stats))
    save_json(os.path.join(out_dir, 'config.json'), config)


SHIPPED_CLASSIFIERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'classifiers')


def find_classifier(dataset, data_dir='data'):
    """The digit classifier folder for a dataset: DATA_DIR/classifier-DATASET if one was trained
    there, else the one shipped in the repository (classifiers/DATASET: the built-in digits' own,
    made by `python metrics.py train-classifier --dataset sc09-espeak`, seed 0), else None."""
    for folder in (os.path.join(data_dir, f'classifier-{dataset}'), os.path.join(SHIPPED_CLASSIFIERS, dataset)):
        if all(os.path.isfile(os.path.join(folder, f)) for f in ('params.npz', 'config.json', 'train_stats.npz')):
            return folder
    return None


def load_classifier(out_dir):
    """-> (params, config dict, train_stats dict with mu, sigma, mean_probs)."""
    params = load_params_npz(os.path.join(out_dir, 'params.npz'))
    with open(os.path.join(out_dir, 'config.json')) as f:
        config = json.load(f)
    with np.load(os.path.join(out_dir, 'train_stats.npz'), allow_pickle=False) as f:
        stats = {k: f[k] for k in f.files}
    return params, config, stats


# ----------------------------------------------------------------------------------------------
# Scores of a set of clips against the training set

def scores(params, train_stats, audio):
    """FID, IS, mIS, AM of (N, S) audio at 16 kHz against the training statistics."""
    feats, probs = classify(params, mel_features(audio))
    return {'n': len(audio),
            'fid': frechet_distance(train_stats['mu'], train_stats['sigma'], *gaussian_stats(feats)),
            'is': inception_score(probs),
            'mis': modified_inception_score(probs),
            'am': float(_kl(train_stats['mean_probs'], probs.mean(0)) + _entropy(probs).mean())}


FLOOR_FRAME = 400  # 25 ms frames at 16 kHz (noise_floor_drift, lpc_bits, frame_nll)


def frame_levels_db(x, frame=FLOOR_FRAME):
    """Mean power of each whole frame of a clip, in dB (a 1e-10 floor)."""
    x = np.asarray(x[:len(x) // frame * frame], np.float64).reshape(-1, frame)
    return 10 * np.log10(np.mean(x**2, 1) + 1e-10)


def noise_floor_drift(clips):
    """How far the noise floor moves within a clip, in dB, the median over clips (not a thesis metric:
    a diagnosis of the samples). Each clip (1-D, its real length) is cut into 25 ms frames; the floor of
    a quarter of the clip is the 10th percentile of its frames' energies in dB; the drift is |last
    quarter's floor - first quarter's|. A recording keeps one floor; a sampler whose noise level wanders
    (into silence, or up into broadband noise) does not. None if a clip is shorter than 4 frames."""
    drifts = []
    for clip in clips:
        n = len(clip) // FLOOR_FRAME
        if n < 4:
            return None
        quarters = np.array_split(frame_levels_db(clip[:n * FLOOR_FRAME]), 4)
        drifts.append(abs(np.percentile(quarters[-1], 10) - np.percentile(quarters[0], 10)))
    return float(np.median(drifts))


PITCH_LAGS = (40, 200)  # 2.5-12.5 ms: pitch periods of 80-400 Hz at 16 kHz
VOICE_FRAME = 800  # 50 ms frames for voiced_share: in 25 ms, noise low-passed at 300 Hz can look periodic
VOICED_PEAK = 0.6  # voiced: the frame correlates with itself one pitch period later at least this much


def periodicity(frame, lags=PITCH_LAGS):
    """How periodic a frame is at a pitch period: the normalised autocorrelation of the frame with itself
    k samples later (Pearson-style: the product sum over the root of both overlaps' energies, so a
    periodic frame scores ~1 at its period whatever the lag; white noise ~0), at its best over the pitch
    lags past the autocorrelation's first zero crossing (so that a slow wave, whose neighbouring samples
    agree, is not taken for a pitch: a pitch detector's usual rule). In [-1, 1]; 0 if it never crosses
    zero, as a constant or silent frame does. The frame must be at least twice the longest lag: at lags
    near its length, a handful of samples would decide the score."""
    if len(frame) < 2 * lags[1]:
        raise ValueError(f"a frame of {len(frame)} samples is too short for pitch lags up to {lags[1]}")
    x = np.asarray(frame, np.float64) - np.mean(frame)
    r = np.array([np.dot(x[:-k], x[k:]) / (np.sqrt(np.dot(x[:-k], x[:-k]) * np.dot(x[k:], x[k:])) + 1e-20)
                  for k in range(1, lags[1] + 1)])  # r[k - 1]: lag k
    crossed = np.flatnonzero(r < 0)
    if not len(crossed):
        return 0.0
    return float(r[max(lags[0], crossed[0] + 1) - 1:].max())


def voiced_share(clips, frame=VOICE_FRAME):
    """The share of loud 50 ms frames (> 15 dB above the clip's floor, the 10th percentile of the levels
    of its frames that are not digital silence: speech) with a pitch-like periodicity, over all clips
    (not a thesis metric: a diagnosis of the samples). Counted: periodicity >= VOICED_PEAK at a pitch
    period of 2.5-12.5 ms. Spoken digits are mostly vowels and voiced consonants (~73% of the built-in
    test clips' loud frames); a model that has not learned the glottal pulse makes loud frames of noise.
    Periodicity is necessary for a voice, not sufficient: a steady tone scores 100%. And noise is not
    always below the bar: 0.27% of 1,500 frames of white noise low-passed at 300 Hz (the built-in set's
    darkest) reach it, none at 1 kHz or white; so below ~1%, there is no voice. None if no loud frame.
    A clip's last partial frame is left out; clips shorter than one frame are skipped."""
    voiced = []
    for clip in clips:
        n = len(clip) // frame * frame
        if n < frame:
            continue
        level = frame_levels_db(clip[:n], frame)
        sound = level[level > -99]  # frame_levels_db puts digital silence at -100 dB
        if not len(sound):
            continue
        floor = np.percentile(sound, 10)
        voiced += [periodicity(f) >= VOICED_PEAK for f, db in zip(np.reshape(clip[:n], (-1, frame)), level)
                   if db > floor + 15]
    return float(np.mean(voiced)) if voiced else None


def split_nll_bits(nll, split, batch_size, put=np.asarray):
    """NLL in bits per sample over the unmasked tokens of a split, batch by batch: nll(tokens, mask)
    -> (sum of -log p in nats, count); put places a host batch (train.py: on its device mesh)."""
    total, count = 0.0, 0.0
    for tokens, mask in data.eval_batches(split, batch_size):
        t, c = nll(put(tokens), put(mask))
        total, count = total + float(t), count + float(c)
    return total / max(count, 1.0) / math.log(2)


def load_run(path):
    """(cfg, EMA params, meta, dataset) of a train.py checkpoint: the model and the data it was trained on."""
    cfg, params, meta = checkpoint.load_model(path)
    tc = meta['train']
    return cfg, params, meta, data.load(meta['data']['name'], tc['data_dir'], tc['size'], tc['seq_len'], tc['path'])


def model_test_nll(path, dtype='float32'):
    """Test NLL (bits per sample) of a train.py checkpoint's EMA weights (the thesis evaluates and
    samples those) on the whole test split of the dataset it was trained on, in the compute dtype given."""
    cfg, params, meta, ds = load_run(path)
    tc = meta['train']
    nll = jax.jit(lambda p, tokens, mask: pf.nll_sum(p, tokens, mask, cfg, dtype=dtype))
    return split_nll_bits(lambda tokens, mask: nll(params, tokens, mask), ds.test, tc['microbatch'] or tc['batch_size'])


# ----------------------------------------------------------------------------------------------
# Where the NLL goes: loud frames and noise-floor frames, against a linear predictor (a diagnosis)

LPC_ORDER = 16  # taps of the reference predictor


def mu_law_edges():
    """(257,) amplitude edges of the 256 mu-law tokens' intervals (data.mu_law_encode's floor rule),
    with -inf and +inf at the ends: token k holds the amplitudes [edges[k], edges[k + 1])."""
    y = np.clip((np.arange(257) - 0.005) / (256 - 0.01) * 2 - 1, -1, 1)
    edges = np.sign(y) * ((1 + data.MU) ** np.abs(y) - 1) / data.MU
    edges[0], edges[-1] = -np.inf, np.inf
    return edges


_phi = np.vectorize(lambda z: 0.5 * math.erfc(-z / math.sqrt(2)))  # the standard normal CDF


def gaussian_token_bits(tokens, mean, sigma):
    """-log2 of the mass N(mean, sigma) puts on each mu-law token's interval (mixed with 0.1% of a
    uniform guess, so a surprise costs at most ~18 bits)."""
    edges = mu_law_edges()
    lo, hi = (edges[tokens] - mean) / sigma, (edges[tokens.astype(np.int64) + 1] - mean) / sigma
    mass = np.where(lo > 0, _phi(-lo) - _phi(-hi), _phi(hi) - _phi(lo))  # the accurate tail of the two
    return -np.log2(0.999 * mass + 0.001 / 256)


def lpc_bits(tokens, order=LPC_ORDER, frame=FLOOR_FRAME):
    """Bits per token of a causal linear predictor of the decoded waveform: each 25 ms frame is
    predicted by a 16-tap predictor fitted (least squares) on the frame before it, with a Gaussian
    residual (the standard deviation of that fit's residual) integrated over the token's interval.
    NaN where no frame before has a full history (the first two frames) and past the last whole frame."""
    x = data.mu_law_decode(tokens).astype(np.float64)
    bits = np.full(len(x), np.nan)
    lags = lambda s, n: np.stack([x[s - j - 1:s - j - 1 + n] for j in range(order)], 1)  # x[t-1..t-order]
    for s in range(2 * frame, len(x) - frame + 1, frame):
        past = lags(s - frame, frame)
        coef = np.linalg.lstsq(past, x[s - frame:s], rcond=None)[0]
        sigma = max(float(np.std(x[s - frame:s] - past @ coef)), 1e-5)
        bits[s:s + frame] = gaussian_token_bits(tokens[s:s + frame], lags(s, frame) @ coef, sigma)
    return bits


def frame_nll(model_bits, tokens, lengths, frame=FLOOR_FRAME):
    """Mean bits per token of the model (model_bits (N, L)) and of lpc_bits, over the loud frames
    (> 15 dB above the clip's floor, the 10th percentile of its frame energies: speech) and the floor
    frames (< 3 dB above it: noise alone) that lpc_bits covers. -> {'loud'|'floor': (frames, model, lpc)}."""
    kinds = {'loud': ([], []), 'floor': ([], [])}
    for bits, q, n in zip(model_bits, tokens, lengths):
        n = n // frame * frame
        if n < 3 * frame:  # no frame with a linear prediction
            continue
        level = frame_levels_db(data.mu_law_decode(q[:n]), frame)
        floor, lpc = np.percentile(level, 10), lpc_bits(q[:n], frame=frame).reshape(-1, frame)
        for j in range(2, n // frame):
            kind = 'loud' if level[j] > floor + 15 else 'floor' if level[j] < floor + 3 else None
            if kind:
                kinds[kind][0].append(bits[j * frame:(j + 1) * frame].mean())
                kinds[kind][1].append(lpc[j].mean())
    return {k: (len(m), float(np.mean(m)) if m else None, float(np.mean(l)) if l else None)
            for k, (m, l) in kinds.items()}


def nll_by_offset(bits, lengths, factor):
    """Mean bits per real token (bits (N, L)) by offset o = (t - F + 1) mod F in the first pooling
    group: with up_pool's shift by F - 1, position t's pooled path has seen the tokens up to t-1-o."""
    real = np.arange(bits.shape[1]) < np.asarray(lengths)[:, None]
    offset = (np.arange(bits.shape[1]) - (factor - 1)) % factor
    return [float(bits[real & (offset == o)].mean()) for o in range(factor)]


def model_token_bits(path, clips):
    """(bits (N, L) of each token under a checkpoint's EMA weights, the first `clips` test clips, cfg)."""
    cfg, params, meta, ds = load_run(path)
    if ds.encoding != 'mu-law':
        raise SystemExit(f"error: {path}: frames needs mu-law audio, not {ds.encoding}")
    split = ds.test if clips is None else ds.test.take(slice(clips))
    logp = jax.jit(lambda p, x: jax.nn.log_softmax(pf.apply(p, x, cfg)))
    bits = [-np.take_along_axis(np.asarray(logp(params, jnp.asarray(split.tokens[i:i + 8], jnp.int32))),
                                split.tokens[i:i + 8, :, None].astype(np.int64), -1)[..., 0] / math.log(2)
            for i in range(0, len(split), 8)]
    return np.concatenate(bits), split, cfg


def format_table(rows):
    """rows: list of (name, dict with nll, fid, is, mis, am, floor_drift_db, voiced) -> text in the layout of
    thesis table 4.5, with the floor drift and the voiced share of loud frames (not thesis metrics) as the last
    columns; "-" where a value is missing."""
    head = (f'{"Model":<40} {"Test NLL ↓":>10} {"FID ↓":>8} {"IS ↑":>7} {"mIS ↑":>8} {"AM ↓":>6} '
            f'{"floor drift dB":>14} {"voiced %":>8}')
    lines = [head, '-' * len(head)]
    for name, r in rows:
        nll = '-' if r.get('nll') is None else f'{r["nll"]:.3f}'
        drift = '-' if r.get('floor_drift_db') is None else f'{r["floor_drift_db"]:.1f}'
        voiced = '-' if r.get('voiced') is None else f'{100 * r["voiced"]:.1f}'
        lines.append(f'{name:<40} {nll:>10} {r["fid"]:>8.2f} {r["is"]:>7.2f} {r["mis"]:>8.2f} {r["am"]:>6.2f} '
                     f'{drift:>14} {voiced:>8}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib, drawn off-screen: a Figure with the Agg canvas, no pyplot state, no display)

def save_figure(fig, path, dpi=100):
    """Write a figure as a PNG, atomically (a watched curves.png is never half-written)."""
    data.write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=dpi))


def smooth(y, window):
    """Trailing mean over the last `window` values (fewer at the start): the training loss drawn
    over its noisy per-batch values."""
    y = np.asarray(y, np.float64)
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def spectrogram_db(audio, sample_rate, n_mels=48, width=128):
    """Mel spectrograms in dB below each clip's loudest point, about `width` frames each:
    (N, S) float audio -> (N, M, T), bands low to high (the STFT size follows the hop)."""
    audio = np.atleast_2d(np.asarray(audio, np.float32))
    hop = max(1, -(-audio.shape[1] // width))
    n_fft = int(min(2048, max(256, 2 ** math.ceil(math.log2(4 * hop)))))
    if audio.shape[1] <= n_fft // 2:                      # reflect padding needs a longer signal
        audio = fit_length(audio, n_fft // 2 + 1)
    return np.asarray(_mel_db_jit(jnp.asarray(audio), sample_rate=int(sample_rate), n_fft=n_fft, hop=hop,
                                  n_mels=n_mels)), hop


def figure_spectrograms(audio, sample_rate, labels=None, title='Mel spectrograms', mark_seconds=None):
    """One mel spectrogram tile per clip, labels[i] (e.g. its NLL and the digit the classifier hears)
    as tile i's title; kHz ticks (mel-spaced) on the left column, seconds under the bottom row, the dB
    colour bar beside. mark_seconds: a dashed line at that time on every tile (a prompt's end)."""
    db, hop = spectrogram_db(audio, sample_rate)
    n, m, t = db.shape
    labels = [f'#{i}' for i in range(n)] if labels is None else [str(label) for label in labels]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.9 * cols + 1.2, 1.55 * rows + 0.9), layout='constrained')
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    seconds = t * hop / sample_rate
    top_mel = float(hz_to_mel(sample_rate / 2))
    khz = [k for k in (0, 1, 2, 4, 8) if k * 1000 <= sample_rate / 2]
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        image = ax.imshow(db[i], origin='lower', aspect='auto', cmap='magma', vmin=-TOP_DB, vmax=0,
                          extent=(0, seconds, 0, top_mel), interpolation='nearest')
        ax.set_title(labels[i], fontsize=7)
        if mark_seconds is not None:
            ax.axvline(mark_seconds, color='white', linestyle='--', linewidth=0.8)
    axes[0, 0].set_yticks([float(hz_to_mel(k * 1000)) for k in khz], [str(k) for k in khz])
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    fig.suptitle(title)
    fig.supxlabel('time (s)')
    fig.supylabel('frequency (kHz, mel scale)')
    fig.colorbar(image, ax=axes, shrink=0.6, label="dB below the clip's loudest point")
    return fig


def line_figure(panels, title):
    """A column of line plots sharing nothing: panels [{'xlabel', 'ylabel', 'series', optional 'marks',
    'xscale'}], series [{'label', 'x', 'y', optional 'alpha', 'marker', 'color'}], marks [(x, leg)]: a
    dashed line where a warm-started leg of the run begins. A legend on every panel with more than one line."""
    fig = Figure(figsize=(8, 3.6 * len(panels)), layout='constrained')
    for ax, panel in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        xlabel, ylabel, series, marks = panel['xlabel'], panel['ylabel'], panel['series'], panel.get('marks', [])
        ax.set_xscale(panel.get('xscale', 'linear'))
        for s in series:
            ax.plot(s['x'], s['y'], label=s['label'], alpha=s.get('alpha', 1.0), marker=s.get('marker'),
                    color=s.get('color'), markersize=4)
        for x, leg in marks:
            ax.axvline(x, color='grey', linestyle='--', linewidth=1, label=f'leg {leg} begins (warm start)')
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) + len(marks) > 1:
            ax.legend()
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------------------------
# The thesis' analysis figures: a values of every RG-LRU layer

# Depth order of a SkipBlock's parts in pf.py (thesis Figure 3.2): the layers before the pooling,
# the inner (deeper) SkipBlock, the layers after. Other keys follow by name, list items by index.
_DEPTH_RANK = {'before': 0, 'down_pool': 1, 'inner': 2, 'up_pool': 3, 'after': 4}


def _depth_key(name):
    return (_DEPTH_RANK.get(name, 5), int(name) if name.isdigit() else -1, name)


def rglru_a_values(params):
    """[(path, complex a (N,))] for every RG-LRU layer of a Poolformer parameter tree, in the order the
    network applies them. An RG-LRU is a dict holding 'lambda_': a = sigmoid(lambda_) exp(i theta)
    (complex) or sigmoid(lambda_) (real, no theta).
    Depth order ASSUMES pf.py's layout: a SkipBlock runs 'before' -> 'inner' -> 'after' (_DEPTH_RANK),
    and a layer stack keeps its L layers on a leading axis, so a 2-D lambda_ (L, N) is L layers,
    listed as path[0] .. path[L-1]."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if 'lambda_' in node:
                mag = 1 / (1 + np.exp(-np.asarray(node['lambda_'], np.float64)))
                theta = np.asarray(node['theta'], np.float64) if 'theta' in node else np.zeros_like(mag)
                a = mag * np.exp(1j * theta)
                found.extend([(f'{path}[{i}]', row) for i, row in enumerate(a)] if a.ndim == 2 else [(path, a)])
                return
            for k in sorted(node, key=lambda k: _depth_key(str(k))):
                walk(node[k], f'{path}/{k}' if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f'{path}/{i}' if path else str(i))
    walk(params, '')
    return found


def figure_mean_abs_a(a_values):
    """Figure 4.9: mean |a| of each RG-LRU layer (x: depth, first layer left; y: mean |a|)."""
    means = np.array([np.abs(a).mean() for _, a in a_values])
    lo = min(0.9, math.floor(means.min() * 10) / 10) if len(means) else 0.0
    fig = Figure(figsize=(7, 4), layout='constrained')
    ax = fig.subplots()
    ax.plot(np.arange(len(means)), means, marker='o', label='mean |a|')
    ax.set(title='Fig. 4.9: mean |a| of each RG-LRU layer', xlabel='RG-LRU layer, in network order (0 = first)',
           ylabel="mean |a| over the layer's channels", ylim=(lo, 1.0))
    ax.grid(alpha=0.3)
    return fig, {'layers': [p for p, _ in a_values], 'mean_abs_a': means.tolist(), 'y_range': [lo, 1.0]}


def figure_complex_plane(a_values, lim=1.1):
    """Figure 4.7: every a in the complex plane with the unit circle; colour goes from the first
    layer to the last, as the colour bar says."""
    fig = Figure(figsize=(6, 5.4), layout='constrained')
    ax = fig.subplots()
    phi = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(phi), np.sin(phi), color='black', linewidth=0.8, label='unit circle, |a| = 1')
    depth = np.concatenate([np.full(np.size(a), i) for i, (_, a) in enumerate(a_values)])
    a = np.concatenate([np.ravel(a) for _, a in a_values])
    dots = ax.scatter(a.real, a.imag, c=depth, cmap='coolwarm', s=6, vmin=0, vmax=max(len(a_values) - 1, 1))
    ax.set(title='Fig. 4.7: a of every RG-LRU channel', xlabel='Re a', ylabel='Im a', xlim=(-lim, lim),
           ylim=(-lim, lim), aspect='equal')
    ax.legend(loc='lower left')
    fig.colorbar(dots, ax=ax, label=f'RG-LRU layer (0 = first, {len(a_values)} layers)')
    return fig, {'layers': [p for p, _ in a_values], 'real': [np.ravel(a).real.tolist() for _, a in a_values],
                 'imag': [np.ravel(a).imag.tolist() for _, a in a_values], 'limits': [-lim, lim]}


def read_log(run_dir):
    """The records of a train.py run's log.jsonl (every run of it, resumed ones appended)."""
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def figure_curves(records, title='Learning curves'):
    """Training loss (per batch, faint, under its trailing mean over ~sqrt(n) of its n points) and
    validation / test NLL (bits per sample, EMA weights) from a train.py log.jsonl's records:
    against wall-clock minutes (when the log has them) above, against the training step below."""
    panels = []
    for x_key, xlabel in (('minutes', 'wall-clock minutes of training (compile and evaluation included)'),
                          ('step', 'training step')):
        series = []
        for key, label in (('loss_bits', 'training loss (batch)'), ('val_nll_bits', 'validation NLL (EMA)'),
                           ('test_nll_bits', 'test NLL (EMA)')):
            points = [(r[x_key], r[key]) for r in records if r.get(key) is not None and r.get(x_key) is not None]
            if not points:
                continue
            x, y = np.array(points, np.float64).T
            x, y = x[np.isfinite(y)], y[np.isfinite(y)]  # a skipped update logs a NaN loss: not drawn, not averaged
            if key == 'loss_bits':
                series += [{'label': label, 'x': x, 'y': y, 'alpha': 0.25, 'color': 'C0'},
                           {'label': 'training loss, smoothed', 'x': x, 'y': smooth(y, round(math.sqrt(len(y)))),
                            'color': 'C0'}]
            else:
                series.append({'label': label, 'x': x, 'y': y, 'marker': 'o',
                               'color': 'C1' if key == 'val_nll_bits' else 'C2'})
        if series:
            legs = [(r[x_key], r['leg']) for r in records if r.get('leg') and r.get(x_key) is not None]
            panels.append({'xlabel': xlabel, 'ylabel': 'bits per sample', 'series': series, 'marks': legs})
    if not panels:
        raise ValueError('no loss_bits, val_nll_bits or test_nll_bits records')
    return line_figure(panels, title)


# ----------------------------------------------------------------------------------------------
# Command line

def _split_audio(split, encoding):
    audio = data.decode(split.tokens, encoding)
    audio = np.where(np.arange(audio.shape[1])[None, :] < split.lengths[:, None], audio, 0.0)  # padding -> 0
    return fit_length(audio)


def cmd_train_classifier(args):
    """Train the digit classifier on the dataset's training split. It sees the 8-bit audio decoded
    from the tokens (data.decode), the same kind of audio the generative model produces."""
    try:
        ds = data.load(args.dataset, data_dir=args.data_dir, size=args.size)  # before any JAX computation
    except data.DataError as e:
        raise SystemExit(f'error: {e}')
    if ds.sample_rate != SAMPLE_RATE:
        raise SystemExit(f'error: --dataset {args.dataset}: {ds.sample_rate} Hz, the classifier needs {SAMPLE_RATE} Hz '
                         f'(sc09 or sc09-espeak)')
    out = args.out or os.path.join(args.data_dir, f'classifier-{args.dataset}')
    train_audio = _split_audio(ds.train, ds.encoding)
    val_images = mel_features(_split_audio(ds.validation, ds.encoding))
    test_audio = _split_audio(ds.test, ds.encoding)
    print(f'{args.dataset}: train {len(train_audio)}, validation {len(val_images)}, test {len(test_audio)} clips')
    t0 = time.perf_counter()
    params, info = train_classifier(jax.random.key(args.seed), train_audio, ds.train.labels,
                                    val_images, ds.validation.labels, steps=args.steps, batch=args.batch,
                                    lr=args.lr)
    train_time = time.perf_counter() - t0
    test_acc = accuracy(params, mel_features(test_audio), ds.test.labels)
    print(f'best validation accuracy {info["val_acc"]:.4f} at step {info["best_step"]}; '
          f'test accuracy {test_acc:.4f}; training took {train_time:.0f} s')

    feats, probs = classify(params, mel_features(train_audio))
    mu, sigma = gaussian_stats(feats)
    stats = {'mu': mu, 'sigma': sigma, 'mean_probs': probs.mean(0)}
    # Sanity rows: held-out clips should score FID ~ 0 and IS ~ K; noise and silence far worse.
    rng = np.random.default_rng(0)
    n = len(test_audio)
    real = [audio[:length] for audio, length in zip(data.decode(ds.test.tokens, ds.encoding), ds.test.lengths)]
    reference = {'held-out test clips': {**scores(params, stats, test_audio), 'floor_drift_db': noise_floor_drift(real),
                                         'voiced': voiced_share(real)},
                 'white noise': scores(params, stats, rng.uniform(-1, 1, (n, CLIP_SAMPLES)).astype(np.float32)),
                 'silence': scores(params, stats, np.zeros((n, CLIP_SAMPLES), np.float32))}
    print(format_table(list(reference.items())))
    config = {'dataset': args.dataset, 'size': args.size, 'encoding': ds.encoding, 'widths': [16, 32, 64],
              'steps': args.steps, 'batch': args.batch, 'lr': args.lr, 'seed': args.seed,
              'best_step': info['best_step'], 'val_accuracy': info['val_acc'], 'test_accuracy': test_acc,
              'train_seconds': round(train_time, 1), 'reference_scores': reference}
    save_classifier(out, params, config, stats)
    print(f'saved {out}')


def evaluate_samples(samples, classifier_dir, checkpoint_path=None, dtype='float32', out=None):
    """Score a folder of WAV samples: FID, IS, mIS, AM under the classifier in classifier_dir, the test
    NLL of checkpoint_path (if given), beside the classifier's held-out-clip row (the ceiling). Prints
    the table, writes out (default SAMPLES/metrics.json) and returns the samples' row."""
    paths = sorted(os.path.join(samples, f) for f in os.listdir(samples) if f.lower().endswith('.wav'))
    if len(paths) < 2:
        raise SystemExit(f'error: --samples {samples}: need at least 2 .wav files, found {len(paths)}')
    params, config, stats = load_classifier(classifier_dir)
    clips = []
    for p in paths:
        try:
            audio, rate = data.read_wav(p)
        except data.WavError as e:
            raise SystemExit(f'error: {e}')
        if rate != SAMPLE_RATE:
            raise SystemExit(f'error: {p}: {rate} Hz, the classifier needs {SAMPLE_RATE} Hz')
        clips.append(np.asarray(audio, np.float32))
    result = scores(params, stats, np.stack([fit_length(c.reshape(1, -1))[0] for c in clips]))
    result['floor_drift_db'] = noise_floor_drift(clips)
    result['voiced'] = voiced_share(clips)
    result['nll'] = model_test_nll(checkpoint_path, dtype) if checkpoint_path else None
    rows = [(f'{os.path.basename(os.path.normpath(samples))} (n={len(clips)})', result)]
    if 'held-out test clips' in config.get('reference_scores', {}):
        ref = config['reference_scores']['held-out test clips']
        rows.append((f'{config["dataset"]} test clips (n={ref["n"]})', ref))  # held-out: the ceiling
    print(format_table(rows))
    print(f'classifier: {classifier_dir} (test accuracy {config.get("test_accuracy", float("nan")):.4f}); '
          f'FID/AM against its {config["dataset"]} training-set statistics')
    out = out or os.path.join(samples, 'metrics.json')
    save_json(out, {'samples': samples, 'checkpoint': checkpoint_path, 'classifier': classifier_dir, **result,
                    'reference': rows[1][1] if len(rows) > 1 else None})
    print(f'wrote {out}')
    return result


def cmd_evaluate(args):
    if not os.path.isdir(args.samples):
        raise SystemExit(f'error: --samples {args.samples}: no such folder (sample.py --out writes one)')
    if args.dataset is None:  # the run's own: an SC09 run's samples are never scored by the built-in digits' classifier
        args.dataset = checkpoint.load_model(args.checkpoint)[2]['data']['name'] if args.checkpoint else 'sc09-espeak'
    cdir = args.classifier or find_classifier(args.dataset, args.data_dir)
    if cdir is None or not os.path.isfile(os.path.join(cdir, 'params.npz')):
        where = args.classifier or os.path.join(args.data_dir, f'classifier-{args.dataset}')
        raise SystemExit(f'error: no digit classifier in {where} (nor one shipped for {args.dataset}); train one '
                         f'first: python metrics.py train-classifier --dataset {args.dataset} --data-dir {args.data_dir}')
    evaluate_samples(args.samples, cdir, args.checkpoint, args.dtype, args.out)


def cmd_frames(args):
    bits, split, cfg = model_token_bits(args.checkpoint, args.clips)
    result = frame_nll(bits, split.tokens, split.lengths)
    print(f'NLL in bits per sample, the first {len(split)} test clips in 25 ms frames; the reference predicts each '
          f'frame with {LPC_ORDER} taps fitted on the frame before')
    print(f'{"frames":<44} {"count":>6} {"model":>7} {"linear":>7}')
    rows = [(label, result[kind]) for kind, label in (('loud', 'loud (> 15 dB above the clip\'s noise floor)'),
                                                        ('floor', 'noise floor (< 3 dB above it)'))]
    if args.per_clip:
        for i in range(len(split)):
            one = frame_nll(bits[i:i + 1], split.tokens[i:i + 1], split.lengths[i:i + 1])
            rows += [(f'test clip {i}: {kind}', one[kind]) for kind in ('loud', 'floor')]
    for label, (n, m, l) in rows:
        print(f'{label:<44} {n:>6} ' + (f'{m:>7.2f} {l:>7.2f}' if n else f'{"-":>7} {"-":>7}'))
    if cfg.pooling:
        print(f'model NLL by offset in the first pooling group (the pooled path has seen up to x[t-1-offset]): ' +
              ', '.join(f'{o}: {b:.2f}' for o, b in enumerate(nll_by_offset(bits, split.lengths, cfg.pooling[0]))))


def cmd_figures(args):
    if args.init:  # a freshly initialised baseline model (thesis Figure 4.7, left column)
        import pf  # only this option needs the model code
        if args.init not in pf.RINGS:
            raise SystemExit(f'error: --init {args.init} is not a ring: {" | ".join(pf.RINGS)}')
        params, source = pf.init(jax.random.key(args.seed), pf.Config(ring=args.init)), f'init ring={args.init}'
        out = args.out or os.path.join('runs', f'figures-init-{args.init}')
    elif args.checkpoint:
        _, params, meta = checkpoint.load_model(args.checkpoint)
        source = f'{args.checkpoint} (EMA weights, step {meta.get("step")})'
        out = args.out or (args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint))
    else:
        raise SystemExit('error: figures: give --checkpoint RUN or --init RING')
    a_values = rglru_a_values(params)
    if not a_values:
        raise SystemExit(f'error: {source}: no RG-LRU parameters (no key lambda_)')
    os.makedirs(out, exist_ok=True)
    for name, draw in (('fig4_9_mean_abs_a', figure_mean_abs_a), ('fig4_7_a_complex_plane', figure_complex_plane)):
        fig, numbers = draw(a_values)
        save_figure(fig, os.path.join(out, name + '.png'))
        save_json(os.path.join(out, name + '.json'), {'source': source, **numbers})
        print(f'wrote {os.path.join(out, name)}.png / .json')
    log = os.path.join(args.checkpoint, 'log.jsonl') if args.checkpoint and os.path.isdir(args.checkpoint) else None
    if log and os.path.isfile(log):  # the run's learning curves
        save_figure(figure_curves(read_log(args.checkpoint), f'Learning curves: {args.checkpoint}'),
                    os.path.join(out, 'curves.png'))
        print(f'wrote {os.path.join(out, "curves.png")}')
    means = [float(np.abs(a).mean()) for _, a in a_values]
    print(f'{len(a_values)} RG-LRU layers; mean |a| first {means[0]:.4f}, last {means[-1]:.4f}, '
          f'max {max(means):.4f} (layer {int(np.argmax(means))})')


def compare_runs(run_dirs):
    """Rows for train.py runs made on the same data and budget (README: the pooling claim): parameters;
    steps, minutes and median tokens/s (the upper median of the logged rates) reached; the validation
    NLL at the end (equal minutes) and at the last evaluation step every run reached (equal steps: the
    data order is the same at every step); the report's FID / IS (samples/metrics.json)."""
    runs = []
    for run in run_dirs:
        try:
            with open(os.path.join(run, 'config.json')) as f:
                model = json.load(f)['model']
            records = read_log(run)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f'error: {run}: not a train.py run folder ({e})')
        cfg = pf.Config(**model)
        evals = {r['step']: r['val_nll_bits'] for r in records if r.get('val_nll_bits') is not None}
        rates = sorted(r['tokens_per_s'] for r in records if r.get('tokens_per_s'))
        try:
            with open(os.path.join(run, 'samples', 'metrics.json')) as f:
                quality = json.load(f)
        except (OSError, ValueError):
            quality = {}
        runs.append({'run': run, 'pooling': list(cfg.pooling), 'layers': list(cfg.layers),
                     'params': pf.count_params(jax.eval_shape(lambda cfg=cfg: pf.init(jax.random.key(0), cfg))),
                     'steps': max((r['step'] for r in records if 'step' in r), default=0),
                     'minutes': max((r['minutes'] for r in records if 'minutes' in r), default=None),
                     'tokens_per_s': rates[len(rates) // 2] if rates else None, 'evals': evals,
                     'val_end': evals[max(evals)] if evals else None, 'fid': quality.get('fid'),
                     'is': quality.get('is')})
    common = set.intersection(*(set(r['evals']) for r in runs)) if runs else set()
    equal_step = max(common, default=None)
    for r in runs:
        r['equal_step'], r['val_equal_steps'] = equal_step, r.pop('evals').get(equal_step)
    return runs


def figure_compare(run_dirs, labels=None):
    """Validation NLL of train.py runs against wall-clock minutes and against the training tokens fed
    (step x batch x sequence length, on a log scale): runs of any size side by side, e.g. the full-size
    model on a GPU beside the CPU preset."""
    by_minutes, by_tokens = [], []
    for i, run in enumerate(run_dirs):
        with open(os.path.join(run, 'config.json')) as f:
            config = json.load(f)
        per_step = config['train']['batch_size'] * config['data']['seq_len']
        evals = np.array([(r['minutes'], r['step'] * per_step, r['val_nll_bits']) for r in read_log(run)
                          if r.get('val_nll_bits') is not None and r.get('minutes') is not None], np.float64)
        if not len(evals):
            raise ValueError(f'{run}: no evaluation in its log.jsonl')
        label = labels[i] if labels else run
        by_minutes.append({'label': label, 'x': evals[:, 0], 'y': evals[:, 2], 'marker': 'o', 'color': f'C{i}'})
        by_tokens.append({'label': label, 'x': evals[:, 1], 'y': evals[:, 2], 'marker': 'o', 'color': f'C{i}'})
    return line_figure([{'xlabel': 'wall-clock minutes of training', 'ylabel': 'validation NLL (bits per sample)',
                         'series': by_minutes},
                        {'xlabel': 'training tokens (steps x batch x sequence length)',
                         'ylabel': 'validation NLL (bits per sample)', 'series': by_tokens, 'xscale': 'log'}],
                       'Validation NLL of the runs')


def cmd_compare(args):
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise SystemExit(f'error: --labels gives {len(args.labels)} names for {len(args.runs)} runs')
    runs = compare_runs(args.runs)
    f = lambda v, spec: '-' if v is None else format(v, spec)
    step = runs[0]['equal_step'] if runs else None
    print(f'| run | pooling | layers | params | minutes | steps | tokens/s | val NLL at the end '
          f'| val NLL at step {f(step, "d")} | FID | IS |\n|---|---|---|---|---|---|---|---|---|---|---|')
    for r in runs:
        print(f"| {r['run']} | {r['pooling']} | {r['layers']} | {r['params']:,} | {f(r['minutes'], '.1f')} | {r['steps']:,} | "
              f"{f(r['tokens_per_s'], ',.0f')} | {f(r['val_end'], '.3f')} | {f(r['val_equal_steps'], '.3f')} | "
              f"{f(r['fid'], '.0f')} | {f(r['is'], '.2f')} |")
    if args.out:
        save_json(args.out, runs)
    if args.figure:
        try:
            save_figure(figure_compare(args.runs, args.labels), args.figure)
        except ValueError as e:
            raise SystemExit(f'error: {e}')
        print(f'wrote {args.figure}')


def parse_args(argv=None):
    parser = data.Parser(description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('train-classifier', help='train the digit classifier for FID / IS / mIS / AM')
    p.add_argument('--dataset', default='sc09-espeak', help='a 16 kHz digit dataset: sc09 | sc09-espeak')
    p.add_argument('--data-dir', default='data', help='where the datasets live')
    p.add_argument('--size', default='default', help="sc09-espeak: 'tiny', 'default' or a clip count")
    p.add_argument('--steps', type=int, default=1000, help='training steps')
    p.add_argument('--batch', type=int, default=64, help='clips per step')
    p.add_argument('--lr', type=float, default=3e-3, help='AdamW peak learning rate (warmup, cosine decay)')
    p.add_argument('--seed', type=int, default=0, help='init, batches and augmentation')
    p.add_argument('--out', default=None, help='the classifier folder (default: DATA_DIR/classifier-DATASET)')
    p.set_defaults(run=cmd_train_classifier)
    p = sub.add_parser('evaluate', help='score a directory of WAV samples (table 4.5 layout)')
    p.add_argument('--samples', required=True, help='a folder of 16 kHz WAVs (sample.py --out)')
    p.add_argument('--checkpoint', default=None, help='train.py run folder or .npz, for the test NLL column')
    p.add_argument('--classifier', default=None, help='the classifier folder (default: DATA_DIR/classifier-DATASET, '
                   'else the one shipped in classifiers/DATASET)')
    p.add_argument('--dataset', default=None, help="whose classifier and training statistics (default: the "
                   "--checkpoint run's dataset, else sc09-espeak)")
    p.add_argument('--data-dir', default='data', help='where the datasets and classifiers live')
    p.add_argument('--out', default=None, help='JSON path (default: SAMPLES/metrics.json)')
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='compute dtype of the test NLL column (as train.py --dtype)')
    p.set_defaults(run=cmd_evaluate)
    p = sub.add_parser('figures', help='figures 4.9 (mean |a| along depth), 4.7 (a in the complex plane) and '
                       'the learning curves (curves.png, from the run\'s log.jsonl)')
    p.add_argument('--checkpoint', default=None, help="train.py run folder (best.npz, else the newest) or .npz")
    p.add_argument('--init', default=None, metavar='RING', help='instead: a freshly initialised baseline, '
                   'ring small | half | full | circle')
    p.add_argument('--seed', type=int, default=0, help='init seed of --init')
    p.add_argument('--out', default=None, help='output folder (default: the run folder)')
    p.set_defaults(run=cmd_figures)
    p = sub.add_parser('frames', help='where the NLL goes: the model against a 16-tap linear predictor in the '
                       'loud (speech) and the noise-floor frames of test clips')
    p.add_argument('--checkpoint', required=True, help='train.py run folder (best.npz, else the newest) or .npz')
    p.add_argument('--clips', type=int, default=32, help='the first N test clips')
    p.add_argument('--per-clip', action='store_true', help='also a row per clip and kind of frame')
    p.set_defaults(run=cmd_frames)
    p = sub.add_parser('compare', help='a markdown table of train.py runs: params, steps, tokens/s, validation '
                       'NLL at equal minutes and at equal steps, FID and IS of their quality reports')
    p.add_argument('runs', nargs='+', help='train.py run folders')
    p.add_argument('--out', default=None, help='also write the rows as JSON here')
    p.add_argument('--figure', default=None, help='also draw their validation NLL against minutes and tokens (PNG)')
    p.add_argument('--labels', nargs='+', default=None, help='the runs\' names in the figure (default: their folders)')
    p.set_defaults(run=cmd_compare)
    args = parser.parse_args(argv)
    for flag in ('steps', 'batch', 'clips'):
        if getattr(args, flag, 1) < 1:
            raise SystemExit(f'error: --{flag} {getattr(args, flag)} must be >= 1')
    return args


def main(argv=None):
    args = parse_args(argv)
    args.run(args)


if __name__ == '__main__':
    main()
