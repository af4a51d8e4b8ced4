"""Datasets for Poolformer: 8-bit tokens from SC09, a built-in spoken-digit stand-in, Beethoven,
YouTubeMix and any byte stream. NumPy and the standard library only: the built-in synthesiser
forks, and a process that has imported JAX must never fork.

Tokens (V = 256, SPEC.md "Tokens")
    mu-law (SC09, YouTubeMix) and linear (Beethoven) 8-bit codes, both after scaling each clip (each
    row of a 2-D input) to [-1, 1] by its own min and max, as SaShiMi does (without its 1e-6 in the
    denominator; a constant clip maps to silence, 128). Decoding returns y = 2q/255 - 1 (mu-law:
    then expanded), which lies inside level q's bin (SaShiMi's linear decoding uses q/128 - 1).
    'bytes' tokens are the raw bytes.

Layouts and splits (data_dir defaults to data/; rows of SC09-style sets in digit, then name order)
    sc09         data/sc09/{zero..nine}/<8-hex speaker>_nohash_<n>.wav + validation_list.txt +
                 testing_list.txt (Speech Commands v0.02, digits only). Split by the two lists, the
                 rest is train: 31,158 / 3,643 / 4,107. Downloaded if absent (resumable, sha256
                 checked, only the digit folders and the lists extracted, unsafe members refused).
    sc09-espeak  The same layout under data/sc09-espeak[-tiny|-N] (4,000 | 200 | N clips), spoken
                 digits synthesised offline with libespeak-ng (wheel espeakng-loader). Each synthetic
                 speaker has a voice, variant, pitch, speed and microphone and says the ten digits
                 with jitter, level, noise, filters and placement of its own. Speaker ids are seeded
                 random 8-hex strings drawn until the archive's own hash rule (which_set) puts every
                 tenth speaker in validation and every tenth in test: the list files come from that
                 rule and the split is 80/10/10 by speaker. The library keeps state between
                 utterances, so a fresh process initialises it once and forks one child per clip:
                 a seed gives byte-identical files. From a process that has imported JAX the build
                 runs in a subprocess.
    beethoven    data/beethoven/*.wav, 8 s clips, linear.      SaShiMi's split: files in natural
    youtubemix   data/youtube_mix/*.wav, 1 min clips, mu-law.  order, first int(0.88 n) train, up to
                 int(0.94 n) validation, the rest test. A file longer than seq_len gives
                 len // seq_len rows (remainder dropped, SaShiMi's drop_last); shorter ones are padded.
    bytes        load('bytes', path=FILE, seq_len=L): the file cut into rows of L bytes (the last one
                 padded), contiguous rows split 90/5/5 (train first, test last).
Rows are padded with SILENCE (128) up to seq_len; Split.lengths says how many tokens are real.
Decoded arrays are cached as .npy (no pickle) in data/cache/, with a JSON manifest holding a
signature (name, size, mtime of every source file) that marks a stale cache.

Bad input (read_wav, then the dataset reader)
    empty, truncated, not RIFF/WAVE, compressed, no samples, NaN/inf   rejected: WavError(path, reason)
    8/24/32-bit integer PCM, 32/64-bit float                          converted to float32
    stereo / multichannel                                             mean of the channels
    another sample rate (e.g. 44.1 kHz)                               resampled to 16 kHz (windowed sinc)
    SC09 clip longer than 1 s (after resampling)                      rejected
    missing list file or digit folder                                 DataError naming the file
A dataset reader skips rejected files and prints "N of M files could not be read" with the first
reasons (again on every cached load); more than 1% bad raises DataError instead.
"""
import argparse
import dataclasses
import fcntl
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import traceback
import urllib.error
import urllib.request

import numpy as np

SAMPLE_RATE = 16000
SILENCE = 128                    # the token of x = 0 in both encodings; also the padding token
MU = 255
DIGITS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
SPLITS = ('train', 'validation', 'test')
SEQ_LEN = {'sc09': 16000, 'sc09-espeak': 16000, 'beethoven': 128000, 'youtubemix': 960512,
           'bytes': 16000}
ENCODING = {'sc09': 'mu-law', 'sc09-espeak': 'mu-law', 'beethoven': 'linear',
            'youtubemix': 'mu-law', 'bytes': 'bytes'}
FOLDER = {'sc09': 'sc09', 'beethoven': 'beethoven', 'youtubemix': 'youtube_mix'}
SIZES = {'tiny': 200, 'default': 4000}
MAX_BAD_FRACTION = 0.01          # more unreadable files than this is an error, not a skip
CACHE_VERSION = 1                # bump when the decoding or encoding changes

SC09_URL = 'https://download.tensorflow.org/data/speech_commands_v0.02.tar.gz'
SC09_SHA256 = 'af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58'
SC09_LISTS = {'validation': 'validation_list.txt', 'test': 'testing_list.txt'}
MAX_NUM_WAVS_PER_CLASS = 2**27 - 1   # from the archive's README (which_set)


class DataError(Exception):
    """A dataset is missing, incomplete or unreadable; the message says what to do."""


class WavError(ValueError):
    """A WAV file that cannot be read, with the file and the reason."""

    def __init__(self, path, reason):
        super().__init__(f'{path}: {reason}')
        self.path, self.reason = str(path), reason


# ------------------------------------------------------------------------------------------------
# Tokens

def _quantize(y):
    """[-1, 1] -> 0..255: floor((y + 1)/2 * (256 - 0.01) + 0.005), SaShiMi's quantiser."""
    return np.floor((y + 1) / 2 * (256 - 0.01) + 0.005).astype(np.uint8)


def mu_law_encode(x):
    """Float audio in [-1, 1] (clipped) -> uint8 mu-law tokens; encode(0) == 128."""
    x = np.clip(np.asarray(x, np.float64), -1, 1)
    return _quantize(np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU))


def mu_law_decode(q):
    """uint8 tokens -> float32 in [-1, 1]."""
    y = 2 * np.asarray(q, np.float64) / 255 - 1
    return (np.sign(y) * ((1 + MU) ** np.abs(y) - 1) / MU).astype(np.float32)


def linear_encode(x):
    """Float audio in [-1, 1] (clipped) -> uint8 linear tokens; encode(0) == 128."""
    return _quantize(np.clip(np.asarray(x, np.float64), -1, 1))


def linear_decode(q):
    """uint8 tokens -> float32 in [-1, 1]."""
    return (2 * np.asarray(q, np.float64) / 255 - 1).astype(np.float32)


def minmax_scale(x):
    """Scale each clip (last axis) to [-1, 1] by its own min and max; a constant clip -> 0."""
    x = np.asarray(x, np.float64)
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    span = hi - lo
    return np.where(span > 0, 2 * (x - lo) / np.where(span > 0, span, 1) - 1, 0.0)


def encode(audio, encoding):
    """Audio clip(s) -> uint8 tokens. 'mu-law' and 'linear' min-max scale each clip first."""
    if encoding == 'mu-law':
        return mu_law_encode(minmax_scale(audio))
    if encoding == 'linear':
        return linear_encode(minmax_scale(audio))
    if encoding == 'bytes':
        return np.frombuffer(audio, np.uint8) if isinstance(audio, bytes) else np.asarray(audio, np.uint8)
    raise ValueError(f"unknown encoding {encoding!r}; expected 'mu-law', 'linear' or 'bytes'")


def decode(tokens, encoding):
    """uint8 tokens -> float32 audio in [-1, 1] ('bytes': the uint8 bytes themselves)."""
    if encoding == 'mu-law':
        return mu_law_decode(tokens)
    if encoding == 'linear':
        return linear_decode(tokens)
    if encoding == 'bytes':
        return np.asarray(tokens, np.uint8)
    raise ValueError(f"unknown encoding {encoding!r}; expected 'mu-law', 'linear' or 'bytes'")


# ------------------------------------------------------------------------------------------------
# WAV files and resampling

def read_wav(path):
    """(samples, sample_rate): mono float32 (integer PCM scaled to [-1, 1), float WAVs as stored,
    channels averaged). Raises WavError(path, reason) for anything it cannot read."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise WavError(path, f'cannot open: {e.strerror}') from None
    if not data:
        raise WavError(path, 'empty file')
    if len(data) < 12 or data[:4] != b'RIFF' or data[8:12] != b'WAVE':
        raise WavError(path, 'not a RIFF/WAVE file')
    fmt, pos = None, 12
    while pos + 8 <= len(data):                                   # walk the chunks
        chunk, size = struct.unpack_from('<4sI', data, pos)
        if chunk == b'fmt ':
            if size < 16 or pos + 8 + size > len(data):
                raise WavError(path, 'truncated or short fmt chunk')
            tag, channels, rate, _, frame_bytes, bits = struct.unpack_from('<HHIIHH', data, pos + 8)
            if tag == 0xFFFE and size >= 40:                      # WAVE_FORMAT_EXTENSIBLE
                tag = struct.unpack_from('<H', data, pos + 8 + 24)[0]
            fmt = tag, channels, rate, frame_bytes, bits
        elif chunk == b'data':
            if fmt is None:
                raise WavError(path, 'data chunk before fmt chunk')
            if pos + 8 + size > len(data):
                raise WavError(path, f'truncated: data chunk says {size} bytes, '
                                     f'{len(data) - pos - 8} present')
            return _pcm_to_float(path, data[pos + 8:pos + 8 + size], *fmt)
        pos += 8 + size + (size & 1)                              # chunks are word-aligned
    raise WavError(path, 'no data chunk' if fmt else 'no fmt chunk (truncated header?)')


def _pcm_to_float(path, raw, tag, channels, rate, frame_bytes, bits):
    if channels < 1 or rate < 1 or frame_bytes != channels * bits // 8:
        raise WavError(path, f'inconsistent header: {channels} channels, {rate} Hz, {bits} bits')
    if len(raw) % frame_bytes:
        raise WavError(path, f'truncated: {len(raw)} data bytes are not whole {frame_bytes}-byte frames')
    if len(raw) == 0:
        raise WavError(path, 'no samples')
    if tag == 1 and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif tag == 1 and bits == 16:
        x = np.frombuffer(raw, '<i2').astype(np.float32) / 2**15
    elif tag == 1 and bits == 24:                                 # 3 little-endian bytes, sign-extended
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16) ^ 0x800000) - 0x800000
        x = x.astype(np.float32) / 2**23
    elif tag == 1 and bits == 32:
        x = (np.frombuffer(raw, '<i4') / 2**31).astype(np.float32)
    elif tag == 3 and bits in (32, 64):
        x = np.frombuffer(raw, '<f4' if bits == 32 else '<f8').astype(np.float32)
        if not np.isfinite(x).all():
            raise WavError(path, 'float samples contain NaN or inf')
    else:
        raise WavError(path, f'unsupported encoding: format tag {tag}, {bits} bits (PCM and IEEE float only)')
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return x, rate


def write_wav(path, audio, sample_rate=SAMPLE_RATE):
    """Write 16-bit mono PCM atomically. audio: int16, or float in [-1, 1] (clipped)."""
    audio = np.asarray(audio)
    if audio.dtype != np.int16:
        audio = np.rint(np.clip(audio, -1, 1) * 32767).astype(np.int16)
    pcm = audio.astype('<i2').tobytes()
    header = struct.pack('<4sI4s4sIHHIIHH4sI', b'RIFF', 36 + len(pcm), b'WAVE', b'fmt ', 16, 1, 1,
                         sample_rate, 2 * sample_rate, 2, 16, b'data', len(pcm))
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        f.write(header + pcm)
    os.replace(tmp, path)


def _sinc_lowpass(dt, fc, half):
    """Hann-windowed ideal low-pass at fc cycles/sample, evaluated at offsets dt (|dt| <= half)."""
    return 2 * fc * np.sinc(2 * fc * dt) * (0.5 + 0.5 * np.cos(np.pi * np.clip(dt / half, -1, 1)))


def resample(audio, rate_in, rate_out, zero_crossings=16):
    """Band-limited resampling (float32 out). A windowed-sinc low-pass at 0.95 x the lower Nyquist
    rate is evaluated at every output instant; the rate ratio up/down is rational, so there are
    only `up` distinct filter phases (polyphase)."""
    audio = np.asarray(audio, np.float64)
    if rate_in == rate_out:
        return audio.astype(np.float32)
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    fc = 0.5 * 0.95 * min(1.0, up / down)                        # cutoff, cycles per input sample
    half = math.ceil(zero_crossings / (2 * fc))                  # filter half-width, input samples
    taps = np.arange(-half + 1, half + 1)                        # (T,) input offsets around floor(t)
    filters = _sinc_lowpass(taps[None, :] - np.arange(up)[:, None] / up, fc, half)  # (up, T) per phase
    filters /= filters.sum(axis=1, keepdims=True)                # unit gain at DC for every phase
    n_out = -(-len(audio) * up // down)                          # ceil(len * rate_out / rate_in)
    base, phase = np.divmod(np.arange(n_out) * down, up)         # output m sits at input base + phase/up
    padded = np.concatenate([np.zeros(half), audio, np.zeros(half + 1)])
    out = np.zeros(n_out)
    for j, tap in enumerate(taps):                               # one tap at a time: small temporaries
        out += padded[base + tap + half] * filters[phase, j]
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Splits and batches

@dataclasses.dataclass(frozen=True)
class Split:
    tokens: np.ndarray    # (N, L) uint8, padded with SILENCE
    lengths: np.ndarray   # (N,) int32, real (unpadded) tokens per row
    labels: np.ndarray    # (N,) int32, digit 0..9 for SC09-style sets, -1 otherwise

    def __len__(self):
        return len(self.tokens)

    def take(self, rows):
        """The split's rows `rows` (an index array or a slice), as a Split."""
        return Split(self.tokens[rows], self.lengths[rows], self.labels[rows])


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    encoding: str         # 'mu-law' | 'linear' | 'bytes'
    sample_rate: int      # 16000 for audio, 0 for bytes
    seq_len: int          # L
    train: Split
    validation: Split
    test: Split


def steps_per_epoch(split, batch_size):
    """Full batches only: the last partial batch of an epoch is dropped."""
    return len(split) // batch_size


def batches(split, batch_size, seed, epoch=0, step=0):
    """Yield (tokens (B, L) uint8, mask (B, L) bool) for steps `step`.. of `epoch`. The row order is
    a permutation seeded by (seed, epoch), so resuming at (epoch, step) yields exactly the batches an
    uninterrupted run would. mask is True on real tokens."""
    order = np.random.default_rng([seed, epoch]).permutation(len(split))
    positions = np.arange(split.tokens.shape[1])
    for s in range(step, steps_per_epoch(split, batch_size)):
        rows = order[s * batch_size:(s + 1) * batch_size]
        yield split.tokens[rows], positions < split.lengths[rows, None]


def eval_batches(split, batch_size):
    """Every row once, in order, in (B, L) batches; the last batch is filled with fully masked rows
    so that every batch has the same shape."""
    positions = np.arange(split.tokens.shape[1])
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, start + batch_size)
        real = rows < len(split)
        rows = np.where(real, rows, 0)
        yield split.tokens[rows], (positions < split.lengths[rows, None]) & real[:, None]


def _pack(rows, labels, seq_len):
    """Lists of token rows (each <= seq_len) and labels -> a Split padded with SILENCE."""
    tokens = np.full((len(rows), seq_len), SILENCE, np.uint8)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
    return Split(tokens, np.array([len(r) for r in rows], np.int32).reshape(-1),
                 np.array(labels, np.int32).reshape(-1))


# ------------------------------------------------------------------------------------------------
# Reading folders of WAVs, with a report of unreadable files and a .npy cache

def _encode_files(root, entries, encoding, seq_len, errors, max_samples=None):
    """Read and encode [(relative path, label)] -> Split. Unreadable files go to `errors`.
    With max_samples (SC09) a clip is one row, cut to seq_len, and longer clips are rejected;
    without, a file gives len // seq_len rows of seq_len (or one padded row if shorter)."""
    rows, labels = [], []
    for rel, label in entries:
        path = os.path.join(root, rel)
        try:
            audio, rate = read_wav(path)
            if rate != SAMPLE_RATE:
                audio = resample(audio, rate, SAMPLE_RATE)
            if max_samples and len(audio) > max_samples:
                raise WavError(path, f'{len(audio)} samples at 16 kHz: longer than 1 s')
        except WavError as e:
            errors.append((e.path, e.reason))
            continue
        starts = [0] if max_samples else range(0, max(len(audio) - seq_len, 0) + 1, seq_len)
        for start in starts:
            rows.append(encode(audio[start:start + seq_len], encoding))
            labels.append(label)
    return _pack(rows, labels, seq_len)


def _report(errors, total):
    """Print how many files were skipped and why; raise if it is more than a stray file or two."""
    if not errors:
        return
    message = f'{len(errors)} of {total} files could not be read'
    lines = [f'  {path}: {reason}' for path, reason in errors[:5]] + (['  ...'] if len(errors) > 5 else [])
    if len(errors) > MAX_BAD_FRACTION * total:
        raise DataError('\n'.join([f'{message} (more than {MAX_BAD_FRACTION:.0%}):'] + lines))
    print('\n'.join([f'data: WARNING: {message} and were skipped:'] + lines), file=sys.stderr)


def _signature(root, relpaths):
    """Hash of the names, sizes and mtimes of the source files: a changed file means a stale cache."""
    h = hashlib.sha1(os.path.abspath(root).encode())
    for rel in relpaths:
        st = os.stat(os.path.join(root, rel))
        h.update(f'{rel}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()


def write_atomic(path, write):
    """write(f) into a temporary file beside path, fsync it, rename it over path, fsync the folder:
    a crash leaves the old file or the new one, never half of one. (Checkpoints, caches, outputs.)"""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _cached_load(cache_dir, key, read):
    """Load the splits from cache_dir if its manifest matches `key`, else call read() -> (splits,
    errors, n_files) and cache the result. The manifest is written last: it marks a complete cache."""
    manifest_path = os.path.join(cache_dir, 'manifest.json')
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = None
    if manifest is not None and manifest.get('key') == key:
        splits = {s: Split(*(np.load(os.path.join(cache_dir, f'{s}_{field}.npy'), allow_pickle=False)
                             for field in ('tokens', 'lengths', 'labels'))) for s in SPLITS}
        _report([tuple(e) for e in manifest['errors']], manifest['files'])
        return splits
    splits, errors, n_files = read()
    _report(errors, n_files)
    os.makedirs(cache_dir, exist_ok=True)
    for s in SPLITS:
        for field in ('tokens', 'lengths', 'labels'):
            array = getattr(splits[s], field)
            write_atomic(os.path.join(cache_dir, f'{s}_{field}.npy'),
                          lambda f: np.save(f, array, allow_pickle=False))
    manifest = {'key': key, 'files': n_files, 'errors': errors}
    write_atomic(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return splits


def _cache_dir(data_dir, root, encoding, seq_len):
    folder = os.path.basename(os.path.normpath(root))
    where = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:8]   # two folders of one name
    return os.path.join(data_dir, 'cache', f'{folder}-{where}-{encoding}-{seq_len}')


def which_set(filename, validation_percentage=10, testing_percentage=10):
    """Speech Commands' split rule (the archive's README): a SHA-1 hash of the speaker id (the name
    before '_nohash_') picks the split, so all clips of a speaker share one split."""
    speaker = re.sub(r'_nohash_.*$', '', os.path.basename(filename))
    h = int(hashlib.sha1(speaker.encode()).hexdigest(), 16)
    percentage = (h % (MAX_NUM_WAVS_PER_CLASS + 1)) * (100.0 / MAX_NUM_WAVS_PER_CLASS)
    if percentage < validation_percentage:
        return 'validation'
    return 'test' if percentage < validation_percentage + testing_percentage else 'train'


def sc09_files(root):
    """{split: [(relative path, digit)]} from the ten digit folders and the two list files, in
    digit order, then by file name."""
    listed = {}
    for split, name in SC09_LISTS.items():
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise DataError(f'{path}: missing list file (SC09 takes its splits from validation_list.txt '
                            'and testing_list.txt next to the digit folders; if an extraction of the archive '
                            f'into {root} was cut short, remove {root} to extract it again)')
        with open(path) as f:
            listed[split] = {line.strip() for line in f if line.strip()}
    files = {s: [] for s in SPLITS}
    for digit, word in enumerate(DIGITS):
        folder = os.path.join(root, word)
        if not os.path.isdir(folder):
            raise DataError(f'{folder}: missing digit folder (expected {root}/{{{",".join(DIGITS)}}}/)')
        for name in sorted(os.listdir(folder)):
            if name.endswith('.wav'):
                rel = f'{word}/{name}'
                split = next((s for s in ('validation', 'test') if rel in listed[s]), 'train')
                files[split].append((rel, digit))
    return files


def _load_sc09(root, data_dir, seq_len):
    files = sc09_files(root)
    relpaths = [rel for s in SPLITS for rel, _ in files[s]] + list(SC09_LISTS.values())
    if len(relpaths) == 2:
        raise DataError(f'{root}: the digit folders hold no .wav files')
    key = {'version': CACHE_VERSION, 'signature': _signature(root, relpaths)}

    def read():
        errors = []
        splits = {s: _encode_files(root, files[s], 'mu-law', seq_len, errors, max_samples=SAMPLE_RATE)
                  for s in SPLITS}
        return splits, errors, len(relpaths) - 2
    return _cached_load(_cache_dir(data_dir, root, 'mu-law', seq_len), key, read)


def natural_key(name):
    """Sort key that orders '2.wav' before '10.wav' (natsort's default, which SaShiMi uses)."""
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def _load_music(name, root, data_dir, seq_len):
    if not os.path.isdir(root):
        raise DataError(f'{root}: no such folder. {name} comes from SaShiMi\'s data release '
                        f'(https://huggingface.co/datasets/krandiash/{name}); unzip it so that '
                        f'{root}/*.wav exist, or pass --path FOLDER')
    names = sorted((n for n in os.listdir(root) if n.endswith('.wav')), key=natural_key)
    n = len(names)
    if n == 0:
        raise DataError(f'{root}: no .wav files')
    bounds = [0, int(0.88 * n), int((0.88 + (1 - 0.88) / 2) * n), n]   # SaShiMi's ratio_min/max
    files = {s: [(f, -1) for f in names[bounds[i]:bounds[i + 1]]] for i, s in enumerate(SPLITS)}
    encoding = ENCODING[name]
    key = {'version': CACHE_VERSION, 'signature': _signature(root, names)}

    def read():
        errors = []
        return {s: _encode_files(root, files[s], encoding, seq_len, errors) for s in SPLITS}, errors, n
    return _cached_load(_cache_dir(data_dir, root, encoding, seq_len), key, read)


def _load_bytes(path, seq_len):
    if not path:
        raise DataError('--dataset bytes needs --path FILE')
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise DataError(f'{path}: cannot read: {e.strerror}') from None
    n_rows = -(-len(data) // seq_len)
    if n_rows < 3:
        raise DataError(f'{path}: {len(data)} bytes make {n_rows} rows of {seq_len}; '
                        'need at least 3 (one per split): use a smaller seq_len')
    tokens = np.full((n_rows, seq_len), SILENCE, np.uint8)
    tokens.reshape(-1)[:len(data)] = data
    lengths = np.full(n_rows, seq_len, np.int32)
    lengths[-1] = len(data) - (n_rows - 1) * seq_len
    n_held_out = max(1, n_rows // 20)                            # 5% each for validation and test
    bounds = [0, n_rows - 2 * n_held_out, n_rows - n_held_out, n_rows]
    return {s: Split(tokens[bounds[i]:bounds[i + 1]], lengths[bounds[i]:bounds[i + 1]],
                     np.full(bounds[i + 1] - bounds[i], -1, np.int32)) for i, s in enumerate(SPLITS)}


# ------------------------------------------------------------------------------------------------
# Real SC09: download (resumable, sha256-checked) and safe extraction

def _download(url, dest, sha256):
    """Download url to dest, resuming dest.part with an HTTP Range request; verify the sha256.
    Network failures propagate (urllib.error.URLError, OSError, http.client.HTTPException)."""
    part = dest + '.part'
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={'Range': f'bytes={have}-'} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as e:
        if e.code != 416:                                         # 416: the .part is already whole
            raise
        response = None
    if response is not None:
        with response, open(part, 'ab' if have and response.status == 206 else 'wb') as f:
            have = have if response.status == 206 else 0          # 200: the server ignored Range
            total = have + int(response.headers.get('Content-Length') or 0)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                have += len(chunk)
                print(f'\rdownloading {url}: {have / 1e6:.0f} of {total / 1e6:.0f} MB',
                      end='', file=sys.stderr, flush=True)
        print(file=sys.stderr)
    h = hashlib.sha256()
    with open(part, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != sha256:
        os.remove(part)
        raise DataError(f'{url}: sha256 {h.hexdigest()} != expected {sha256}; '
                        'deleted the download, run again')
    os.replace(part, dest)


def extract_sc09(archive, root):
    """Extract only the ten digit folders and the two list files of `archive` into `root`.
    Any absolute path, '..' component, link or special file in the archive is refused."""
    tmp = f'{root}.extracting-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = [p for p in member.name.split('/') if p not in ('', '.')]
                if (member.name.startswith('/') or '..' in parts or '\\' in member.name
                        or not (member.isfile() or member.isdir())):
                    raise DataError(f'{archive}: refusing unsafe archive member {member.name!r} '
                                    '(absolute path, .. component, link or special file)')
                wanted = ((len(parts) == 2 and parts[0] in DIGITS)
                          or (len(parts) == 1 and parts[0] in SC09_LISTS.values()))
                if member.isfile() and wanted:
                    os.makedirs(os.path.join(tmp, *parts[:-1]), exist_ok=True)
                    with tar.extractfile(member) as src, open(os.path.join(tmp, *parts), 'wb') as dst:
                        shutil.copyfileobj(src, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.exists(root):  # one rename: a run killed here leaves root whole or absent, never half
        os.replace(tmp, root)
        return
    for name in os.listdir(tmp):  # root was there already (empty, or holding other files): a move each
        os.replace(os.path.join(tmp, name), os.path.join(root, name))
    os.rmdir(tmp)


def _prepare_sc09(root, data_dir):
    """Download and extract SC09 into root unless its digit folders are already there (the reader names
    any digit folder or list file missing then)."""
    if any(os.path.isdir(os.path.join(root, word)) for word in DIGITS):
        return
    archive = os.path.join(data_dir, os.path.basename(SC09_URL))
    if not os.path.exists(archive):
        os.makedirs(data_dir, exist_ok=True)
        try:
            _download(SC09_URL, archive, SC09_SHA256)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            resume = '; the partial download resumes next time' if os.path.exists(archive + '.part') else ''
            raise DataError(
                f'SC09 is not in {root} and could not be downloaded from {SC09_URL} '
                f'({getattr(e, "reason", e)}{resume}).\n'
                f'Either put Speech Commands v0.02 there in its own layout '
                f'({root}/zero/<speaker>_nohash_<n>.wav ... {root}/nine/, validation_list.txt, '
                f'testing_list.txt), or use the built-in spoken digits: python data.py --dataset sc09-espeak'
            ) from None
    print(f'extracting the ten digit folders of {archive} into {root}', file=sys.stderr)
    extract_sc09(archive, root)


# ------------------------------------------------------------------------------------------------
# Built-in SC09 stand-in: spoken digits from libespeak-ng, one forked process per clip

ESPEAK_RATE = 22050
VOICES = ('en', 'en-us', 'en-gb-scotland', 'en-gb-x-rp', 'en-029', 'en-us-nyc', 'en-gb-x-gbclan')
VARIANTS = ('m1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'f1', 'f2', 'f3', 'f4', 'f5',
            'klatt', 'klatt2', 'klatt3', 'klatt4', 'Andy', 'annie', 'david', 'edward', 'linda', 'max')


@dataclasses.dataclass(frozen=True)
class Clip:
    """Everything random about one clip, drawn in the parent, so a child is a pure function of it."""
    file: str             # 'zero/1a2b3c4d_nohash_0.wav'
    voice: str            # espeak-ng voice+variant, fixed per speaker
    rate: int             # words per minute
    pitch: int            # 0..100
    pitch_range: int      # 0..100
    lowpass_hz: float     # microphone low-pass (0: none), fixed per speaker
    highpass_hz: float    # 0: none
    level_db: float       # speech peak level
    snr_db: float         # speech to background noise
    noise_lowpass_hz: float  # colour of the noise (0: white)
    length: int           # clip length in samples (<= 16000; raised to fit the speech)
    offset: float         # where the speech starts, as a fraction of the free room
    seed: int             # for the noise samples


def _speaker_ids(n, rng):
    """n distinct 8-hex speaker ids; speaker s is meant for validation if s % 10 == 8, test if
    s % 10 == 9, train otherwise, and ids are drawn until which_set agrees."""
    ids = []
    for s in range(n):
        want = {8: 'validation', 9: 'test'}.get(s % 10, 'train')
        while True:
            speaker = f'{int(rng.integers(2**32)):08x}'
            if speaker not in ids and which_set(f'{speaker}_nohash_0.wav') == want:
                break
        ids.append(speaker)
    return ids


def plan_clips(count, seed=0):
    """The clips of a built set: speakers with a voice, pitch, speed and microphone of their own,
    each saying the ten digits once with per-clip jitter, level, noise, filtering and placement."""
    rng = np.random.default_rng(seed)
    clips = []
    for s, speaker in enumerate(_speaker_ids(-(-count // 10), rng)):
        voice = f'{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}'
        pitch, pitch_range, rate = rng.uniform(15, 85), rng.uniform(10, 90), rng.uniform(130, 230)
        lowpass = rng.uniform(2500, 7500) if rng.random() < 0.6 else 0.0
        for digit in range(min(10, count - 10 * s)):
            clips.append(Clip(
                file=f'{DIGITS[digit]}/{speaker}_nohash_0.wav', voice=voice,
                rate=int(np.clip(rate + rng.uniform(-20, 20), 110, 260)),
                pitch=int(np.clip(pitch + rng.uniform(-8, 8), 0, 100)),
                pitch_range=int(np.clip(pitch_range + rng.uniform(-10, 10), 0, 100)),
                lowpass_hz=lowpass, highpass_hz=rng.uniform(60, 400) if rng.random() < 0.4 else 0.0,
                level_db=rng.uniform(-24, -1), snr_db=rng.uniform(10, 45),
                noise_lowpass_hz=rng.uniform(300, 4000) if rng.random() < 0.5 else 0.0,
                length=SAMPLE_RATE if rng.random() < 0.8 else int(rng.uniform(0.45, 1.0) * SAMPLE_RATE),
                offset=rng.random(), seed=int(rng.integers(2**63))))
    return clips


def _espeak_library():
    """libespeak-ng through ctypes, initialised, with its voice list read once: forked children then
    skip re-reading ~300 voice files for every clip."""
    import ctypes
    import espeakng_loader
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.c_void_p
    AUDIO_OUTPUT_SYNCHRONOUS = 2
    data_path = espeakng_loader.get_data_path().encode()
    if lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0) != ESPEAK_RATE:
        raise RuntimeError('espeak_Initialize failed')
    lib.espeak_ListVoices(None)
    return lib


def _espeak(lib, text, voice, rate, pitch, pitch_range):
    """int16 speech at 22,050 Hz. Call once per process: the library keeps state between utterances."""
    import ctypes
    POS_CHARACTER, CHARS_UTF8, RATE, PITCH, RANGE = 1, 1, 1, 3, 4  # speak_lib.h enums
    chunks = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    def on_audio(wav, n, events):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0                                                  # 0: keep synthesising
    lib.espeak_SetSynthCallback(on_audio)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise RuntimeError(f'espeak-ng has no voice {voice!r}')
    for parameter, value in ((RATE, rate), (PITCH, pitch), (RANGE, pitch_range)):
        lib.espeak_SetParameter(parameter, value, 0)
    text = text.encode() + b'\0'
    if lib.espeak_Synth(text, len(text), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None) != 0:
        raise RuntimeError(f'espeak_Synth failed for {text!r}')
    return np.concatenate(chunks)


def _lowpass(x, cutoff_hz, half=64):
    taps = np.arange(-half, half + 1)
    h = _sinc_lowpass(taps, cutoff_hz / SAMPLE_RATE, half + 1)
    return np.convolve(x, h / h.sum(), mode='same')


def synthesise(lib, clip):
    """One clip of the built-in set: 16 kHz int16, at most 16,000 samples."""
    word = clip.file.split('/')[0]
    speech = _espeak(lib, word, clip.voice, clip.rate, clip.pitch, clip.pitch_range) / 32768.0
    loud = np.flatnonzero(np.abs(speech) > 0.02 * np.abs(speech).max())
    speech = resample(speech[max(loud[0] - 200, 0):loud[-1] + 200], ESPEAK_RATE, SAMPLE_RATE)
    speech = speech[:SAMPLE_RATE].astype(np.float64)             # (the rare over-long word is cut)
    if clip.lowpass_hz:
        speech = _lowpass(speech, clip.lowpass_hz)
    if clip.highpass_hz:
        speech = speech - _lowpass(speech, clip.highpass_hz, half=256)
    speech *= 10 ** (clip.level_db / 20) / np.abs(speech).max()
    length = min(SAMPLE_RATE, max(clip.length, len(speech) + 800))
    start = int(clip.offset * (length - len(speech)))
    audio = np.zeros(length)
    audio[start:start + len(speech)] = speech
    noise = np.random.default_rng(clip.seed).standard_normal(length)
    if clip.noise_lowpass_hz:
        noise = _lowpass(noise, clip.noise_lowpass_hz)
    audio += noise * np.sqrt(np.mean(speech**2) / np.mean(noise**2)) * 10 ** (-clip.snr_db / 20)
    return np.rint(np.clip(audio, -1, 1) * 32767).astype(np.int16)


def _run_forked(jobs, workers):
    """Run each job (function, argument) in its own forked child, `workers` at a time; return the
    number that failed (their tracebacks go to stderr)."""
    running, failed = set(), 0
    for function, argument in jobs:
        while len(running) >= workers:
            pid, status = os.wait()
            running.discard(pid)
            failed += os.waitstatus_to_exitcode(status) != 0
        pid = os.fork()
        if pid == 0:                                              # child: do the job, never return
            code = 0
            try:
                function(argument)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                code = 1
            os._exit(code)
        running.add(pid)
    while running:
        pid, status = os.wait()
        running.discard(pid)
        failed += os.waitstatus_to_exitcode(status) != 0
    return failed


def _synthesise_clips(job):
    """In a fresh process: initialise espeak-ng once, then synthesise every clip in a child of its
    own (clips are then independent of each other and of the order they run in)."""
    clips, folder = job
    lib = _espeak_library()

    def write_clip(clip):
        write_wav(os.path.join(folder, clip.file), synthesise(lib, clip))
    failed = _run_forked([(write_clip, clip) for clip in clips], workers=os.cpu_count() or 1)
    if failed:
        raise RuntimeError(f'{failed} of {len(clips)} clips failed to synthesise')


def build_sc09_espeak(root, count, seed=0):
    """Synthesise `count` clips into root in the Speech Commands layout, unless a complete build
    (build.json, written last) with the same count and seed is there. Returns root."""
    manifest = {'count': count, 'seed': seed, 'version': CACHE_VERSION}
    manifest_path = os.path.join(root, 'build.json')

    def complete():
        try:
            with open(manifest_path) as f:
                return json.load(f) == manifest
        except (OSError, ValueError):
            return False
    if complete():
        return root
    if 'jax' in sys.modules:                                      # never fork a process with JAX in it
        subprocess.run([sys.executable, '-c', f'import data; data.build_sc09_espeak('
                        f'{os.path.abspath(root)!r}, {count}, {seed})'],
                       cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
        return root
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(f'{root}.lock', 'w') as lock:                       # one builder at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete():
            return root
        started = time.time()
        print(f'synthesising {count} spoken digits into {root} ...', file=sys.stderr, flush=True)
        tmp = f'{root}.building'
        shutil.rmtree(tmp, ignore_errors=True)
        for word in DIGITS:
            os.makedirs(os.path.join(tmp, word))
        clips = plan_clips(count, seed)
        if _run_forked([(_synthesise_clips, (clips, tmp))], workers=1):
            raise RuntimeError(f'synthesis failed (errors above); the partial build in {tmp} is not used')
        for split, name in SC09_LISTS.items():
            listed = sorted(c.file for c in clips if which_set(c.file) == split)
            with open(os.path.join(tmp, name), 'w') as f:
                f.write(''.join(line + '\n' for line in listed))
        with open(os.path.join(tmp, 'build.json'), 'w') as f:
            json.dump(manifest, f)
        shutil.rmtree(root, ignore_errors=True)                   # an incomplete or older build
        os.rename(tmp, root)
        print(f'synthesised {count} clips in {time.time() - started:.0f} s', file=sys.stderr)
    return root


# ------------------------------------------------------------------------------------------------
# Entry points

def _size_count(size):
    if size in SIZES:
        return SIZES[size]
    if str(size).isdigit() and int(size) > 0:
        return int(size)
    raise DataError(f"size must be 'tiny', 'default' or a positive clip count, not {size!r}")


def load(name, data_dir='data', size='default', seq_len=None, path=None):
    """Load (downloading or building first if needed) a dataset as uint8 token splits.
    path: the dataset folder (the file for 'bytes'); defaults to a folder under data_dir."""
    if name not in SEQ_LEN:
        raise DataError(f'unknown dataset {name!r}; choose from {", ".join(SEQ_LEN)}')
    seq_len = seq_len or SEQ_LEN[name]
    if name == 'bytes':
        splits = _load_bytes(path, seq_len)
    elif name == 'sc09-espeak':
        count = _size_count(size)
        suffix = '' if size == 'default' else f'-{size}'
        root = build_sc09_espeak(path or os.path.join(data_dir, f'sc09-espeak{suffix}'), count)
        splits = _load_sc09(root, data_dir, seq_len)
    elif name == 'sc09':
        root = path or os.path.join(data_dir, FOLDER[name])
        _prepare_sc09(root, data_dir)
        splits = _load_sc09(root, data_dir, seq_len)
    else:
        splits = _load_music(name, path or os.path.join(data_dir, FOLDER[name]), data_dir, seq_len)
    return Dataset(name, ENCODING[name], 0 if name == 'bytes' else SAMPLE_RATE, seq_len, **splits)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the description as written and every flag's default after its help (unless the
    help already says it, the flag is required or its default is None)."""

    def _get_help_string(self, action):
        text = action.help or ''
        if '(default' in text or action.required or action.default in (None, argparse.SUPPRESS):
            return text
        shown = ' '.join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else '%(default)s'
        return f'{text} (default: {shown})'


class Parser(argparse.ArgumentParser):
    """The commands' argument parser: HelpFormatter, and a usage error as one line, 'error: ...'."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{'formatter_class': HelpFormatter, **kwargs})

    def error(self, message):
        self.exit(2, f'error: {message} (see {self.prog} --help)\n')


def parse_args(argv=None):
    parser = Parser(description='Prepare a dataset (download, build or check it) '
                    'and print the number of clips in each split.')
    parser.add_argument('--dataset', required=True, choices=sorted(SEQ_LEN), help='which dataset')
    parser.add_argument('--data-dir', default='data', help='datasets and their .npy cache live here')
    parser.add_argument('--size', default='default', help="sc09-espeak: 'tiny', 'default' or a clip count")
    parser.add_argument('--path', help='the dataset folder (for bytes: the file)')
    parser.add_argument('--seq-len', type=int, help='tokens per row (default: the dataset\'s own)')
    args = parser.parse_args(argv)
    if args.seq_len is not None and args.seq_len < 1:
        raise SystemExit(f'error: --seq-len {args.seq_len} must be >= 1')
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        ds = load(args.dataset, args.data_dir, args.size, args.seq_len, args.path)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    counts = ' | '.join(f'{s} {len(getattr(ds, s))}' for s in SPLITS)
    print(f'{ds.name}: {counts} rows of {ds.seq_len} {ds.encoding} tokens')
    return 0


if __name__ == '__main__':
    sys.exit(main())
