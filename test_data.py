"""Tests for data.py: each test names the property it checks. References are independent where
possible: the stdlib `wave` module for WAV files, the Speech Commands hash rule re-derived here,
analytic sines for resampling."""
import ast
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import types
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import data

HERE = os.path.dirname(os.path.abspath(__file__))
unit = st.floats(-1, 1, allow_nan=False)


# ------------------------------------------------------------------------------------------------
# Tokens

def test_silence_is_token_128():
    assert data.SILENCE == 128
    assert data.mu_law_encode(0.0) == 128 and data.linear_encode(0.0) == 128
    assert data.mu_law_encode(1.0) == 255 and data.mu_law_encode(-1.0) == 0
    assert (data.encode(np.zeros(50), 'mu-law') == 128).all()          # a constant clip is silence
    assert data.encode(np.array([-0.5, 0.0, 0.5]), 'mu-law')[1] == 128   # symmetric clip: 0 stays 0


def test_a_clips_tokens_do_not_depend_on_the_float_type_it_was_read_in():
    """read_wav returns float32: the min-max scaling runs in float64 either way, so a float32 clip and the
    same values as float64 give the same tokens, in both encodings (float32 arithmetic moves 3 of
    these 128,000 tokens at a quantiser boundary)."""
    x = np.random.default_rng(0).normal(0, 0.2, (8, 16000)).astype(np.float32)
    for encoding in ('mu-law', 'linear'):
        np.testing.assert_array_equal(data.encode(x, encoding), data.encode(x.astype(np.float64), encoding))


def reference_mu_law(x):
    """8-bit mu-law written out here in full, scalar, with the math module: the companding curve
    y = sgn(x) ln(1 + mu |x|) / ln(1 + mu), mu = 255 (ITU-T G.711's mu-law, as WaveNet and SaShiMi
    use it), then the 256-level quantiser q = floor((y + 1) / 2 * (256 - 0.01) + 0.005), which sends
    -1 to 0, 0 to 128 and 1 to 255 (the project's specification of the encoding)."""
    y = math.copysign(math.log(1 + 255 * abs(x)) / math.log(256), x)
    return math.floor((y + 1) / 2 * (256 - 0.01) + 0.005)


@settings(max_examples=50, deadline=None)
@given(st.lists(unit, min_size=1, max_size=50))
def test_mu_law_matches_the_spec_formula(xs):
    assert data.mu_law_encode(np.array(xs)).tolist() == [reference_mu_law(x) for x in xs]


@settings(max_examples=50, deadline=None)
@given(st.lists(unit, min_size=1, max_size=200))
def test_decode_of_encode_stays_within_one_quantisation_step(xs):
    x = np.array(xs)
    for enc, dec in ((data.mu_law_encode, data.mu_law_decode), (data.linear_encode, data.linear_decode)):
        q = enc(x).astype(int)
        # x lies between the neighbouring levels, so the error is below the local step
        below, above = dec(np.maximum(q - 1, 0)), dec(np.minimum(q + 1, 255))
        assert ((below <= x + 1e-6) & (x <= above + 1e-6)).all(), np.abs(dec(q) - x).max()
        step = np.maximum(above - dec(q), dec(q) - below)
        assert (np.abs(dec(q) - x) <= step + 1e-6).all(), np.abs(dec(q) - x).max()
    assert np.abs(data.linear_decode(data.linear_encode(x)) - x).max() <= 2 / 255 + 1e-6


@settings(max_examples=50, deadline=None)
@given(st.lists(unit, min_size=2, max_size=100))
def test_encodings_are_monotonic(xs):
    x = np.sort(np.array(xs))
    for enc in (data.mu_law_encode, data.linear_encode):
        assert (np.diff(enc(x).astype(int)) >= 0).all()


def test_every_level_is_reachable_and_decode_is_increasing():
    """...and data.decode(tokens, name), what WAVs and the scores go through, is the named encoding's."""
    x = np.linspace(-1, 1, 200001)
    for name, enc, dec in (('mu-law', data.mu_law_encode, data.mu_law_decode),
                           ('linear', data.linear_encode, data.linear_decode)):
        assert set(enc(x).tolist()) == set(range(256))
        levels = dec(np.arange(256, dtype=np.uint8))
        assert (np.diff(levels) > 0).all() and levels[0] == -1 and levels[-1] == 1
        np.testing.assert_array_equal(data.decode(np.arange(256, dtype=np.uint8), name), levels)
    # linear levels are evenly spaced, 2 q / 255 - 1
    np.testing.assert_allclose(data.decode(np.arange(256, dtype=np.uint8), 'linear'), np.arange(256) * 2 / 255 - 1,
                               atol=1e-7)


def test_encode_scales_each_row_by_its_own_min_and_max():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4, 300)) * np.array([[0.01], [1], [50], [3]]) + np.array([[0], [2], [-7], [0]])
    for encoding in ('mu-law', 'linear'):
        tokens = data.encode(rows, encoding)
        assert tokens.dtype == np.uint8
        for row, t in zip(rows, tokens):
            assert (t == data.encode(row, encoding)).all()
            assert t[row.argmin()] == 0 and t[row.argmax()] == 255
    assert data.decode(data.encode(b'\x00\x07\xff', 'bytes'), 'bytes').tolist() == [0, 7, 255]
    with pytest.raises(ValueError, match='unknown encoding'):
        data.encode(rows, 'a-law')


# ------------------------------------------------------------------------------------------------
# WAV files

def stdlib_wav(path, ints, width, channels=1, rate=16000):
    """Write integer PCM with the stdlib wave module (the independent reference)."""
    with wave.open(str(path), 'wb') as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        raw = np.asarray(ints)
        if width == 1:
            w.writeframes((raw + 128).astype(np.uint8).tobytes())
        elif width == 3:
            w.writeframes(b''.join(int(v).to_bytes(3, 'little', signed=True) for v in raw.ravel()))
        else:
            w.writeframes(raw.astype(f'<i{width}').tobytes())


def raw_wav(path, tag, bits, channels, rate, payload, extensible=False):
    """A WAV with a hand-written header (for formats the wave module cannot write)."""
    frame = channels * bits // 8
    fmt = struct.pack('<HHIIHH', 0xFFFE if extensible else tag, channels, rate, rate * frame, frame, bits)
    if extensible:
        fmt += struct.pack('<HHI', 22, bits, 0) + struct.pack('<H', tag) + b'\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71'
    body = b'WAVE' + b'fmt ' + struct.pack('<I', len(fmt)) + fmt + b'data' + struct.pack('<I', len(payload)) + payload
    with open(path, 'wb') as f:
        f.write(b'RIFF' + struct.pack('<I', len(body)) + body)


def test_write_atomic_takes_a_bare_file_name_in_the_current_folder(tmp_path, monkeypatch):
    """`python metrics.py compare RUN... --figure compare.png`: a path with no folder part is written (and
    replaced whole) in the current folder, with no temporary file left beside it."""
    monkeypatch.chdir(tmp_path)
    data.write_atomic('out.bin', lambda f: f.write(b'abc'))
    data.write_atomic('out.bin', lambda f: f.write(b'de'))
    assert os.listdir(tmp_path) == ['out.bin'] and (tmp_path / 'out.bin').read_bytes() == b'de'


def test_write_wav_is_16_bit_mono_pcm_read_back_by_the_stdlib(tmp_path):
    audio = np.array([0, 0.5, -0.5, 1, -1, 2, -2])
    data.write_wav(tmp_path / 'a.wav', audio, 16000)
    with wave.open(str(tmp_path / 'a.wav')) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 16000, 7)
        ints = np.frombuffer(w.readframes(7), '<i2')
    assert ints.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767]    # rint(x * 32767), clipped
    pcm = np.array([-32768, -1, 0, 1, 32767], np.int16)
    data.write_wav(tmp_path / 'b.wav', pcm, 8000)
    x, rate = data.read_wav(tmp_path / 'b.wav')
    assert rate == 8000 and x.dtype == np.float32 and (x * 32768 == pcm).all()
    assert sorted(os.listdir(tmp_path)) == ['a.wav', 'b.wav']                 # no temporary files left


def test_write_wav_header_fields_are_those_of_16_bit_mono_pcm(tmp_path):
    data.write_wav(tmp_path / 'a.wav', np.zeros(10), 22050)
    raw = (tmp_path / 'a.wav').read_bytes()
    tag, channels, rate, byte_rate, block, bits = struct.unpack('<HHIIHH', raw[20:36])
    assert (tag, channels, rate, byte_rate, block, bits) == (1, 1, 22050, 44100, 2, 16)  # players trust byte_rate
    assert struct.unpack('<I', raw[4:8])[0] == len(raw) - 8 and struct.unpack('<I', raw[40:44])[0] == 20


def test_an_odd_sized_chunk_before_the_samples_is_skipped_with_its_pad_byte(tmp_path):
    """RIFF pads a chunk of odd size with one byte (a LIST chunk of tags often has one): the reader steps
    over it and reads the samples after it."""
    pcm = np.array([100, -200, 300, -400], '<i2')
    fmt = struct.pack('<HHIIHH', 1, 1, 16000, 32000, 2, 16)
    body = (b'WAVE' + b'fmt ' + struct.pack('<I', 16) + fmt + b'LIST' + struct.pack('<I', 5) + b'INFOx' + b'\x00'
            + b'data' + struct.pack('<I', pcm.nbytes) + pcm.tobytes())
    (tmp_path / 'odd.wav').write_bytes(b'RIFF' + struct.pack('<I', len(body)) + body)
    x, rate = data.read_wav(tmp_path / 'odd.wav')
    assert rate == 16000 and (x * 32768).tolist() == pcm.tolist()


@pytest.mark.parametrize('width, scale', [(1, 128), (2, 2**15), (3, 2**23), (4, 2**31)])
def test_integer_pcm_of_every_width_and_stereo_is_converted_to_float(tmp_path, width, scale):
    rng = np.random.default_rng(width)
    ints = rng.integers(-scale, scale, size=(100, 2))
    stdlib_wav(tmp_path / 's.wav', ints, width, channels=2, rate=44100)
    x, rate = data.read_wav(tmp_path / 's.wav')
    assert rate == 44100 and x.shape == (100,)
    np.testing.assert_allclose(x, ints.mean(axis=1) / scale, atol=1e-6)     # stereo -> mean of channels


def test_float_and_extensible_wavs_are_read(tmp_path):
    samples = np.array([0.25, -0.75, 0.5, 1.0], np.float32)
    raw_wav(tmp_path / 'f32.wav', 3, 32, 1, 16000, samples.tobytes())
    raw_wav(tmp_path / 'f64.wav', 3, 64, 1, 16000, samples.astype(np.float64).tobytes())
    raw_wav(tmp_path / 'ext.wav', 1, 16, 1, 16000, (samples * 2**15).astype('<i2').tobytes()[:6] + b'\0\0',
            extensible=True)
    assert (data.read_wav(tmp_path / 'f32.wav')[0] == samples).all()
    assert (data.read_wav(tmp_path / 'f64.wav')[0] == samples).all()
    assert data.read_wav(tmp_path / 'ext.wav')[0].tolist() == [0.25, -0.75, 0.5, 0.0]


def test_unreadable_wavs_raise_an_error_naming_the_file_and_the_reason(tmp_path):
    good = tmp_path / 'good.wav'
    data.write_wav(good, np.zeros(1000))
    whole = good.read_bytes()
    cases = {
        'empty.wav': (b'', 'empty file'),
        'truncated.wav': (whole[:1200], 'truncated'),
        'header_only.wav': (whole[:30], 'truncated or short fmt chunk'),
        'text.wav': (b'hello, this is not audio', 'not a RIFF/WAVE file'),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
    raw_wav(tmp_path / 'alaw.wav', 6, 8, 1, 8000, b'\x55' * 10)
    raw_wav(tmp_path / 'nan.wav', 3, 32, 1, 16000, np.array([0, np.nan], np.float32).tobytes())
    raw_wav(tmp_path / 'inf.wav', 3, 64, 1, 16000, np.array([0, -np.inf, 0.5]).tobytes())
    raw_wav(tmp_path / 'no_samples.wav', 1, 16, 1, 16000, b'')
    raw_wav(tmp_path / 'half_frame.wav', 1, 16, 2, 16000, b'\0' * 6)    # stereo: 1.5 frames of 4 bytes
    cases['alaw.wav'] = (None, 'unsupported encoding: format tag 6')
    cases['nan.wav'] = (None, 'NaN or inf')
    cases['inf.wav'] = (None, 'NaN or inf')
    cases['no_samples.wav'] = (None, 'no samples')
    cases['half_frame.wav'] = (None, 'not whole 4-byte frames')
    cases['missing.wav'] = (None, 'cannot open')
    for name, (_, reason) in cases.items():
        with pytest.raises(data.WavError) as e:
            data.read_wav(tmp_path / name)
        assert isinstance(e.value, ValueError) and str(tmp_path / name) in str(e.value)
        assert reason in e.value.reason, (name, e.value.reason)


@pytest.mark.parametrize('rate_in, rate_out', [(44100, 16000), (22050, 16000), (8000, 16000)])
def test_resampling_keeps_a_tone_and_its_timing(rate_in, rate_out):
    n = rate_in // 2 + 1                  # half a second and one sample: 44.1 and 22.05 kHz give no whole count
    tone = np.sin(2 * np.pi * 1000 * np.arange(n) / rate_in)
    out = data.resample(tone, rate_in, rate_out)
    assert len(out) == math.ceil(n * rate_out / rate_in)  # as scipy.signal.resample_poly: the last partial sample kept
    expected = np.sin(2 * np.pi * 1000 * np.arange(len(out)) / rate_out)
    interior = slice(200, -200)                                   # away from the zero-padded edges
    err = np.abs(out[interior] - expected[interior]).max()
    assert err < 2e-3, err


def test_resampling_removes_tones_above_the_new_nyquist_rate():
    tone = np.sin(2 * np.pi * 10000 * np.arange(22050) / 44100)   # 10 kHz > 8 kHz
    out = data.resample(tone, 44100, 16000)[200:-200]
    assert np.sqrt(np.mean(out**2)) < 0.01 * np.sqrt(0.5), np.sqrt(np.mean(out**2))


# ------------------------------------------------------------------------------------------------
# The built-in set

def tf_which_set(filename):
    """The split rule as written in TensorFlow's speech_commands/input_data.py."""
    hash_name = re.sub(r'_nohash_.*$', '', os.path.basename(filename))
    percentage = (int(hashlib.sha1(hash_name.encode()).hexdigest(), 16) % (2**27)) * (100.0 / (2**27 - 1))
    return 'validation' if percentage < 10 else 'test' if percentage < 20 else 'train'


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp('data')
    ds = data.load('sc09-espeak', data_dir=str(data_dir), size='tiny')
    return data_dir / 'sc09-espeak-tiny', ds


def test_built_set_has_the_archive_layout_and_speaker_splits(tiny):
    root, ds = tiny
    files = sorted(f'{w}/{n}' for w in data.DIGITS for n in os.listdir(root / w))
    assert len(files) == data.SIZES['tiny'] == 200
    assert sorted(os.listdir(root)) == sorted([*data.DIGITS, 'build.json', 'testing_list.txt', 'validation_list.txt'])
    lengths = []
    for f in files:
        assert re.fullmatch(r'(zero|one|two|three|four|five|six|seven|eight|nine)/[0-9a-f]{8}_nohash_\d+\.wav', f)
        with wave.open(str(root / f)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
            assert 0 < w.getnframes() <= 16000
            lengths.append(w.getnframes())
    assert 0.05 < np.mean(np.array(lengths) < 16000) < 0.5      # some clips are shorter than 1 s
    # the list files are exactly the archive's hash rule
    for split, name in (('validation', 'validation_list.txt'), ('test', 'testing_list.txt')):
        assert (root / name).read_text().split() == [f for f in files if tf_which_set(f) == split]
    speakers = {s: {f.split('/')[1].split('_')[0] for f in files if tf_which_set(f) == s} for s in data.SPLITS}
    assert not (speakers['train'] & speakers['validation'] or speakers['train'] & speakers['test']
                or speakers['validation'] & speakers['test'])
    # tiny: 20 speakers of 10 digits are exactly 16/2/2 speakers; default sizes are checked below
    assert [len(getattr(ds, s)) for s in data.SPLITS] == [160, 20, 20]


@pytest.mark.parametrize('count', [data.SIZES['default'], 1234])
def test_built_split_sizes_are_within_2_percent_of_80_10_10(count):
    clips = data.plan_clips(count, seed=0)
    assert len(clips) == count and len({c.file for c in clips}) == count
    fractions = [np.mean([tf_which_set(c.file) == s for c in clips]) for s in data.SPLITS]
    assert np.abs(np.array(fractions) - [0.8, 0.1, 0.1]).max() <= 0.02, fractions
    assert len({c.voice for c in clips}) > 50 and len({c.rate for c in clips}) > 50   # varied voices


# A plan for synthesise() with espeak replaced by a known word: no filters, no noise left after int16 (300 dB)
PLAN = data.Clip(file='zero/00000000_nohash_0.wav', voice='en', rate=175, pitch=50, pitch_range=50,
                 lowpass_hz=0.0, highpass_hz=0.0, level_db=-6.0, snr_db=300.0, noise_lowpass_hz=0.0,
                 length=16000, offset=0.5, seed=0)


def test_a_synthesised_clip_has_its_plans_pitch_duration_level_and_noise(monkeypatch):
    """synthesise() against its Clip, with espeak replaced by a word we know: half a second of a 440 Hz
    tone at espeak's 22,050 Hz. At 16 kHz the clip keeps the tone's pitch and duration (8,000 samples),
    sits where `offset` puts it, peaks at `level_db`, and carries noise whose RMS, before the speech and
    under it, is `snr_db` below the speech's own RMS."""
    tone = np.sin(2 * np.pi * 440 * np.arange(data.ESPEAK_RATE // 2) / data.ESPEAK_RATE)
    monkeypatch.setattr(data, '_espeak', lambda *args: np.round(20000 * tone))
    clean = data.synthesise(None, PLAN) / 32767                      # 300 dB: no noise left after int16
    noisy = data.synthesise(None, dataclasses.replace(PLAN, snr_db=20.0)) / 32767
    first, last = np.flatnonzero(clean)[[0, -1]]                      # (the tone's zero crossings round to 0)
    assert len(clean) == 16000 and abs(last + 1 - first - 8000) <= 2, (first, last)
    assert abs(first - 4000) <= 2, first                               # offset 0.5 of the 8,000 free samples
    assert np.argmax(np.abs(np.fft.rfft(clean))) == 440                # 1 Hz bins: the tone's pitch is kept
    assert abs(np.abs(clean).max() - 10 ** (-6 / 20)) < 1e-3           # the peak is level_db
    noise, speech_rms = noisy - clean, np.sqrt(np.mean(clean[first:last + 1] ** 2))
    for where in (slice(0, first), slice(first, last + 1)):            # background before, and under the speech
        ratio_db = 20 * np.log10(speech_rms / np.sqrt(np.mean(noise[where] ** 2)))
        assert abs(ratio_db - 20) < 0.5, (where, ratio_db)


def test_the_microphones_filters_keep_the_bands_their_cutoffs_name(monkeypatch):
    """synthesise()'s microphone and noise colour, with espeak replaced by a word of two equal tones, 100
    and 3,000 Hz: with no filter the two stay equal (within 25%); a 1,000 Hz low-pass leaves the high
    tone under 0.1% of the low one, an 800 Hz high-pass the low one under 0.1% of the high one; noise
    low-passed at 500 Hz has under 0.01% of its power above 2 kHz (white noise: over 70%)."""
    t = np.arange(data.ESPEAK_RATE // 2) / data.ESPEAK_RATE
    word = 10000 * (np.sin(2 * np.pi * 100 * t) + np.sin(2 * np.pi * 3000 * t))
    monkeypatch.setattr(data, '_espeak', lambda *args: np.round(word))
    clip = lambda **change: data.synthesise(None, dataclasses.replace(PLAN, **change)) / 32767

    def tones(**change):  # each tone's peak in the 1 Hz bins of the 16,000-sample clip
        spectrum = np.abs(np.fft.rfft(clip(**change)))
        return spectrum[90:111].max(), spectrum[2990:3011].max()
    low, high = tones()
    assert 0.8 < low / high < 1.25
    low, high = tones(lowpass_hz=1000.0)
    assert high < 0.001 * low
    low, high = tones(highpass_hz=800.0)
    assert low < 0.001 * high

    def noise_above_2khz(cutoff):  # the noise's share of its power above 2 kHz
        power = np.abs(np.fft.rfft(clip(snr_db=10.0, noise_lowpass_hz=cutoff) - clip())) ** 2
        return power[2000:].sum() / power.sum()
    assert noise_above_2khz(500.0) < 1e-4 and noise_above_2khz(0.0) > 0.7


def test_the_same_seed_builds_byte_identical_files(tmp_path):
    roots = [data.build_sc09_espeak(str(tmp_path / name), 20, seed) for name, seed in (('a', 5), ('b', 5), ('c', 6))]

    def contents(root):
        return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), 'rb').read()
                for d, _, names in os.walk(root) for n in names}
    a, b, c = (contents(r) for r in roots)
    assert len(a) == 20 + 3 and a == b
    assert a != c
    mtime = os.path.getmtime(os.path.join(roots[0], 'build.json'))
    data.build_sc09_espeak(roots[0], 20, 5)                        # complete: not rebuilt
    assert os.path.getmtime(os.path.join(roots[0], 'build.json')) == mtime
    data.build_sc09_espeak(roots[0], 20, 6)                        # another seed's build: made anew
    assert contents(roots[0]) == c


def test_the_synthesisers_chunks_are_kept_not_views_of_its_reused_buffer(tmp_path):
    """espeak-ng hands its audio over in chunks of one buffer it reuses (60 ms at 22,050 Hz). A word kept as
    views of that buffer would be its last state repeated; kept as copies, no stretch of the word repeats
    itself exactly at any lag. (The library in a fresh process: it keeps state between utterances.)"""
    out = tmp_path / 'seven.npy'
    subprocess.run([sys.executable, '-c', 'import sys, numpy as np, data; '
                    'np.save(sys.argv[1], data._espeak(data._espeak_library(), "seven", "en+m3", 175, 50, 50))',
                    str(out)], cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    x = np.load(out, allow_pickle=False)
    assert len(x) > 5 * 1323  # several chunks
    repeats = [lag for lag in range(100, len(x) // 2)
               if x[:lag].any() and np.array_equal(x[:lag], x[lag:2 * lag])]
    assert repeats == [] and np.abs(x).max() > 10000  # (views: repeats at 1324, 2648, ...; peak 4585, not 22302)


def test_load_builds_the_digits_in_the_folder_path_names(tmp_path):
    """data.load('sc09-espeak', path=...) (train.py --path): the clips are built and read there, not
    in a folder under data_dir."""
    mine = tmp_path / 'mine'
    ds = data.load('sc09-espeak', data_dir=str(tmp_path / 'data'), size='20', path=str(mine))
    assert (mine / 'build.json').exists() and sum(len(os.listdir(mine / w)) for w in data.DIGITS) == 20
    assert sorted(os.listdir(tmp_path / 'data')) == ['cache']  # only the token cache
    assert len(ds.train) + len(ds.validation) + len(ds.test) == 20


def test_build_in_a_process_with_jax_runs_in_a_subprocess(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'jax', types.ModuleType('jax'))
    monkeypatch.setattr(os, 'fork', lambda: pytest.fail('forked a process that has imported JAX'))
    root = data.build_sc09_espeak(str(tmp_path / 'b'), 10)
    assert len(os.listdir(os.path.join(root, 'zero'))) == 1 and os.path.exists(os.path.join(root, 'build.json'))


# ------------------------------------------------------------------------------------------------
# Reading SC09-style folders

def test_sc09_reader_gives_the_list_file_splits_labels_and_padding(tiny):
    root, ds = tiny
    assert (ds.name, ds.encoding, ds.sample_rate, ds.seq_len) == ('sc09-espeak', 'mu-law', 16000, 16000)
    in_order = lambda files: sorted(files, key=lambda f: (data.DIGITS.index(f.split('/')[0]), f))  # rows: by digit, then name
    validation = in_order((root / 'validation_list.txt').read_text().split())
    test = in_order((root / 'testing_list.txt').read_text().split())
    assert (len(ds.validation), len(ds.test), len(ds.train)) == (len(validation), len(test), 200 - len(validation) - len(test))
    for split, listed in ((ds.validation, validation), (ds.test, test)):
        assert split.tokens.shape == (len(listed), 16000) and split.tokens.dtype == np.uint8
        assert split.labels.tolist() == [data.DIGITS.index(f.split('/')[0]) for f in listed]
        for i in (0, len(listed) - 1):
            audio, _ = data.read_wav(root / listed[i])
            assert split.lengths[i] == len(audio)
            assert (split.tokens[i, :len(audio)] == data.encode(audio, 'mu-law')).all()
            assert (split.tokens[i, len(audio):] == data.SILENCE).all()
    assert sorted(np.bincount(ds.train.labels).tolist()) == [16] * 10


def counting_reads(monkeypatch):
    """Count the WAV files data.py reads from now on (a cache hit reads none)."""
    reads, real = [], data.read_wav
    monkeypatch.setattr(data, 'read_wav', lambda path: reads.append(path) or real(path))
    return reads


def test_second_load_comes_from_the_cache_and_a_changed_file_invalidates_it(tiny, tmp_path, monkeypatch):
    root = tmp_path / 'sc09'
    shutil.copytree(tiny[0], root)
    reads = counting_reads(monkeypatch)
    first = data.load('sc09', data_dir=str(tmp_path), path=str(root))
    assert len(reads) == 200
    second = data.load('sc09', data_dir=str(tmp_path), path=str(root))
    assert len(reads) == 200, 'the second load read WAV files: no cache hit'
    for s in data.SPLITS:
        for field in ('tokens', 'lengths', 'labels'):
            assert (getattr(getattr(first, s), field) == getattr(getattr(second, s), field)).all()
    listed = min((root / 'validation_list.txt').read_text().split(), key=lambda f: (data.DIGITS.index(f.split('/')[0]), f))
    data.write_wav(root / listed, np.linspace(-1, 1, 500))             # a different clip
    third = data.load('sc09', data_dir=str(tmp_path), path=str(root))
    assert len(reads) > 200
    assert third.validation.lengths[0] == 500
    assert (third.validation.tokens[0, :500] == data.mu_law_encode(np.linspace(-1, 1, 500))).all()
    # a clip rewritten with the same size (re-recorded, re-synthesised) invalidates the cache too
    data.write_wav(root / listed, np.linspace(1, -1, 500))
    st = os.stat(root / listed)
    os.utime(root / listed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime, whatever the clock
    fourth = data.load('sc09', data_dir=str(tmp_path), path=str(root))
    assert (fourth.validation.tokens[0, :500] == data.mu_law_encode(np.linspace(1, -1, 500))).all()
    # and so do edited split lists, even where the clips in split order stay the same: a, b | c -> a | b, c
    a, b, c = (f'nine/{p.name}' for p in sorted((root / 'nine').glob('*.wav'))[:3])
    for validation, test in (([a, b], [c]), ([a], [b, c])):
        (root / 'validation_list.txt').write_text(''.join(f'{n}\n' for n in validation))
        (root / 'testing_list.txt').write_text(''.join(f'{n}\n' for n in test))
        ds = data.load('sc09', data_dir=str(tmp_path), path=str(root))
        assert (len(ds.validation), len(ds.test)) == (len(validation), len(test))
    # a manifest cut short (a disk full, a copy killed part-way) is a cache miss: the WAVs are read again
    manifest = next((tmp_path / 'cache').glob('*/manifest.json'))
    manifest.write_bytes(manifest.read_bytes()[:20])
    before = len(reads)
    again = data.load('sc09', data_dir=str(tmp_path), path=str(root))
    assert len(reads) > before and (again.test.tokens == ds.test.tokens).all()
    assert json.loads(manifest.read_text())['files'] > 0  # and written whole again
    # a cache file whose header declares object entries (a pickle would follow) is refused, never unpickled;
    # planted as a header and bytes, so that nothing here pickles either
    with open(next((tmp_path / 'cache').glob('*/train_labels.npy')), 'wb') as f:
        np.lib.format.write_array_header_1_0(f, {'descr': '|O', 'fortran_order': False, 'shape': (3,)})
        f.write(b'not a pickle')
    with pytest.raises(ValueError, match='allow_pickle=False'):
        data.load('sc09', data_dir=str(tmp_path), path=str(root))


def test_one_bad_file_among_many_is_reported_with_a_count_and_too_many_raise(tiny, tmp_path, capsys, monkeypatch):
    root = tmp_path / 'sc09'
    shutil.copytree(tiny[0], root)
    wavs = sorted(root.glob('*/*.wav'))
    wavs[0].write_bytes(wavs[0].read_bytes()[:500])                  # truncated
    ds = data.load('sc09', data_dir=str(tmp_path), path=str(root))
    assert sum(len(getattr(ds, s)) for s in data.SPLITS) == 199
    err = capsys.readouterr().err
    assert '1 of 200 files could not be read' in err and str(wavs[0]) in err and 'truncated' in err
    reads = counting_reads(monkeypatch)
    data.load('sc09', data_dir=str(tmp_path), path=str(root))         # from the cache: reported again
    assert reads == [] and '1 of 200 files could not be read' in capsys.readouterr().err
    wavs[1].write_bytes(b'')  # 2 of 200: exactly 1%, still skipped ("more than 1%" raises)
    ds = data.load('sc09', data_dir=str(tmp_path), path=str(root))
    assert sum(len(getattr(ds, s)) for s in data.SPLITS) == 198
    assert '2 of 200 files could not be read' in capsys.readouterr().err
    for w in wavs[1:4]:
        w.write_bytes(b'')
    with pytest.raises(data.DataError, match=r'4 of 200 files could not be read[\s\S]*empty file'):
        data.load('sc09', data_dir=str(tmp_path), path=str(root))


def test_other_rates_and_formats_are_converted_and_long_clips_rejected(tiny, tmp_path, capsys):
    root = tmp_path / 'sc09'
    shutil.copytree(tiny[0], root)
    wavs = sorted(root.glob('*/*.wav'))
    audio, _ = data.read_wav(wavs[0])
    up = data.resample(audio, 16000, 44100)
    stdlib_wav(wavs[0], np.round(np.stack([up, up], 1) * 2**23 * 0.99), 3, channels=2, rate=44100)
    stdlib_wav(wavs[1], np.zeros(17000, int), 2)                      # 1.06 s
    ds = data.load('sc09', data_dir=str(tmp_path), path=str(root))
    assert sum(len(getattr(ds, s)) for s in data.SPLITS) == 199
    assert 'longer than 1 s' in capsys.readouterr().err
    rel = '/'.join(wavs[0].parts[-2:])
    split = next(s for s in data.SPLITS if rel in [r for r, _ in data.sc09_files(str(root))[s]])
    index = [r for r, _ in data.sc09_files(str(root))[split]].index(rel)
    row = getattr(ds, split)
    assert row.lengths[index] == len(audio)                           # 44.1 kHz stereo 24-bit -> 16 kHz
    agree = np.mean(np.abs(row.tokens[index, :len(audio)].astype(int) - data.encode(audio, 'mu-law')) <= 2)
    assert agree > 0.95, agree


def test_a_missing_digit_folder_is_named(tiny, tmp_path):
    root = tmp_path / 'sc09'
    shutil.copytree(tiny[0], root)
    shutil.rmtree(root / 'seven')
    with pytest.raises(data.DataError, match=re.escape(str(root / 'seven')) + r': missing digit folder'):
        data.load('sc09', data_dir=str(tmp_path), path=str(root))


def test_a_missing_list_file_is_named(tiny, tmp_path):
    root = tmp_path / 'sc09'
    shutil.copytree(tiny[0], root)
    os.remove(root / 'testing_list.txt')
    with pytest.raises(data.DataError, match=r'testing_list.txt: missing list file'):
        data.load('sc09', data_dir=str(tmp_path), path=str(root))


# ------------------------------------------------------------------------------------------------
# Beethoven, YouTubeMix and bytes

def test_music_folders_use_natural_order_and_sashimis_88_6_6_split(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / 'beethoven'
    folder.mkdir()
    clips = {}
    for i in range(25):                                              # file i has 100 + i samples
        clips[i] = rng.uniform(-0.5, 0.5, 100 + i)
        data.write_wav(folder / f'{i}.wav', clips[i])
    ds = data.load('beethoven', data_dir=str(tmp_path), seq_len=200)
    assert (ds.encoding, ds.seq_len) == ('linear', 200)
    assert [len(getattr(ds, s)) for s in data.SPLITS] == [22, 1, 2]    # int(.88 n), int(.94 n)
    assert ds.train.lengths.tolist() == list(range(100, 122))          # 2.wav before 10.wav
    assert ds.validation.lengths.tolist() == [122] and ds.test.lengths.tolist() == [123, 124]
    expected = data.linear_encode(data.minmax_scale(data.read_wav(folder / '24.wav')[0]))
    assert (ds.test.tokens[1, :124] == expected).all() and (ds.test.tokens[1, 124:] == 128).all()
    assert (ds.train.labels == -1).all()


def test_youtubemix_cuts_long_files_into_rows_of_seq_len(tmp_path):
    folder = tmp_path / 'youtube_mix'
    folder.mkdir()
    for i in range(10):                                                # a quiet first row, then a loud one
        t = np.arange(450 + i)
        data.write_wav(folder / f'out{i:03d}.wav', np.sin(t / 7) * np.where(t < 200, 0.05, 0.3))
    ds = data.load('youtubemix', data_dir=str(tmp_path), seq_len=200)
    assert ds.encoding == 'mu-law'
    assert [len(getattr(ds, s)) for s in data.SPLITS] == [16, 2, 2]   # 2 rows a file, remainder dropped
    assert (ds.train.lengths == 200).all()
    x = data.read_wav(folder / 'out000.wav')[0]
    for row, cut in ((0, x[:200]), (1, x[200:400])):                   # each row min-max scaled on its own
        assert (ds.train.tokens[row] == data.encode(cut, 'mu-law')).all()
    assert ds.train.tokens[0].min() == 0 and ds.train.tokens[0].max() == 255   # the quiet row too
    ds = data.load('youtubemix', data_dir=str(tmp_path), seq_len=150)  # another length: its own cache
    assert ds.train.tokens.shape[1] == 150 and [len(getattr(ds, s)) for s in data.SPLITS] == [24, 3, 3]
    with pytest.raises(data.DataError, match='huggingface.co/datasets/krandiash/beethoven'):
        data.load('beethoven', data_dir=str(tmp_path / 'nowhere'))


def test_bytes_rows_cover_the_file_in_order_with_a_90_5_5_split(tmp_path):
    content = bytes(np.random.default_rng(1).integers(0, 256, 10000, dtype=np.uint8)) + 'naïve text\n'.encode()
    (tmp_path / 'f.bin').write_bytes(content)
    ds = data.load('bytes', path=str(tmp_path / 'f.bin'), seq_len=64)
    assert (ds.encoding, ds.sample_rate) == ('bytes', 0)
    n_rows = math.ceil(len(content) / 64)
    assert [len(getattr(ds, s)) for s in data.SPLITS] == [n_rows - 14, 7, 7]
    joined = b''.join(bytes(row[:n]) for s in data.SPLITS for row, n in zip(getattr(ds, s).tokens, getattr(ds, s).lengths))
    assert joined == content
    assert (ds.test.tokens[-1, ds.test.lengths[-1]:] == data.SILENCE).all() and (ds.test.labels == -1).all()
    with pytest.raises(data.DataError, match='need at least 3'):
        data.load('bytes', path=str(tmp_path / 'f.bin'), seq_len=8000)
    (tmp_path / 'whole.bin').write_bytes(content[:640])                # 10 whole rows: the last one full too
    ds = data.load('bytes', path=str(tmp_path / 'whole.bin'), seq_len=64)
    assert [s.lengths.tolist() for s in (ds.train, ds.validation, ds.test)] == [[64] * 8, [64], [64]]
    out = subprocess.run([sys.executable, 'data.py', '--dataset', 'bytes', '--path', str(tmp_path / 'f.bin'),
                          '--seq-len', '64'], cwd=HERE, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f'bytes: train {n_rows - 14} | validation 7 | test 7 rows of 64 bytes tokens'


# ------------------------------------------------------------------------------------------------
# Batches

def small_split(n=23, length=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, n).astype(np.int32)
    tokens = np.full((n, length), data.SILENCE, np.uint8)
    for i, k in enumerate(lengths):
        tokens[i, :k] = rng.integers(0, 256, k)
    return data.Split(tokens, lengths, np.arange(n, dtype=np.int32))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 5), st.integers(1, 8), st.integers(0, 10))
def test_resuming_at_epoch_and_step_yields_what_an_uninterrupted_run_would(seed, epoch, batch_size, step):
    split = small_split()
    full = list(data.batches(split, batch_size, seed, epoch))
    resumed = list(data.batches(split, batch_size, seed, epoch, step))
    assert len(full) == data.steps_per_epoch(split, batch_size) == 23 // batch_size
    assert len(resumed) == max(0, len(full) - step)
    for (t1, m1), (t2, m2) in zip(full[step:], resumed):
        assert (t1 == t2).all() and (m1 == m2).all()
    rows = [r for tokens, _ in full for r in map(bytes, tokens)]
    assert len(set(rows)) == len(rows)                                # no row twice in an epoch


def test_batches_mask_real_tokens_and_reshuffle_each_epoch():
    split = small_split()
    lookup = {bytes(t): i for i, t in enumerate(split.tokens)}
    orders = []
    for epoch in range(3):
        order = []
        for tokens, mask in data.batches(split, 5, seed=7, epoch=epoch):
            assert tokens.shape == mask.shape == (5, 12) and mask.dtype == bool
            rows = [lookup[bytes(t)] for t in tokens]
            assert (mask == (np.arange(12) < split.lengths[rows, None])).all()
            order += rows
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]
    # each (seed, epoch) has its own order: seed 1's first epoch is not seed 0's second
    first = lambda seed, epoch: [lookup[bytes(t)] for tokens, _ in data.batches(split, 5, seed, epoch) for t in tokens]
    assert first(1, 0) != first(0, 1) and first(2, 0) != first(0, 2) and first(2, 0) != first(1, 1)
    seen = [lookup[bytes(t)] for tokens, mask in data.eval_batches(split, 5) for t, m in zip(tokens, mask) if m.any()]
    assert seen == list(range(23))                                    # every row once, in order, last batch padded


# ------------------------------------------------------------------------------------------------
# Real SC09: download, resume, sha256, safe extraction, offline message

def closed_port_url():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return f'http://127.0.0.1:{port}/speech_commands_v0.02.tar.gz'


def test_offline_fails_with_one_message_naming_the_url_layout_and_builtin_set(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, 'SC09_URL', closed_port_url())
    assert data.main(['--dataset', 'sc09', '--data-dir', str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count('error:') == 1 and data.SC09_URL in err
    assert 'zero/<speaker>_nohash_<n>.wav' in err and 'validation_list.txt' in err and '--dataset sc09-espeak' in err


def make_archive(tiny_root, members_extra=()):
    """A small Speech Commands-like archive: directory entries (as the real one has), digit clips, a
    non-digit folder, the two list files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
        for word in ('zero', 'one'):
            tar.add(tiny_root / word, arcname=f'./{word}', recursive=False)  # the folder's own entry
            for name in sorted(os.listdir(tiny_root / word))[:3]:
                tar.add(tiny_root / word / name, arcname=f'./{word}/{name}')
        for word in data.DIGITS[2:]:
            tar.add(tiny_root / word / sorted(os.listdir(tiny_root / word))[0], arcname=f'{word}/x_nohash_0.wav')
        tar.add(tiny_root / 'zero' / sorted(os.listdir(tiny_root / 'zero'))[0], arcname='bed/y_nohash_0.wav')
        for name in ('validation_list.txt', 'testing_list.txt'):
            info = tarfile.TarInfo(name)
            info.size = len(b'zero/none.wav\n')
            tar.addfile(info, io.BytesIO(b'zero/none.wav\n'))
        for info in members_extra:
            tar.addfile(info, io.BytesIO(b'evil\n' if info.isfile() else b''))
    return buffer.getvalue()


class RangeServer(BaseHTTPRequestHandler):
    body, ranges, honours_range = b'', [], True

    def do_GET(self):
        start = int(re.match(r'bytes=(\d+)-', self.headers.get('Range', 'bytes=0-')).group(1))
        start = start if self.honours_range else 0  # a server without Range support sends it all, with 200
        RangeServer.ranges.append(self.headers.get('Range'))
        self.send_response(206 if start else 200)
        self.send_header('Content-Length', str(len(self.body) - start))
        self.end_headers()
        self.wfile.write(self.body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def range_server(monkeypatch):
    """RangeServer on a free local port for one test (its class attributes restored after): -> its URL."""
    monkeypatch.setattr(RangeServer, 'ranges', [])
    server = ThreadingHTTPServer(('127.0.0.1', 0), RangeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_port}'
    server.shutdown()
    server.server_close()


def test_download_resumes_a_partial_file_verifies_sha256_and_extracts_only_digits(tiny, tmp_path, monkeypatch,
                                                                                    capsys, range_server):
    archive = make_archive(tiny[0])
    monkeypatch.setattr(RangeServer, 'body', archive)
    monkeypatch.setattr(data, 'SC09_URL', f'{range_server}/speech_commands_v0.02.tar.gz')
    monkeypatch.setattr(data, 'SC09_SHA256', hashlib.sha256(archive).hexdigest())
    (tmp_path / 'speech_commands_v0.02.tar.gz.part').write_bytes(archive[:1000])
    ds = data.load('sc09', data_dir=str(tmp_path))
    assert RangeServer.ranges == ['bytes=1000-']
    assert (tmp_path / 'speech_commands_v0.02.tar.gz').read_bytes() == archive
    assert sorted(os.listdir(tmp_path / 'sc09')) == sorted([*data.DIGITS, 'testing_list.txt', 'validation_list.txt'])
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (14, 0, 0)
    assert 'downloading' in capsys.readouterr().err
    # a corrupted download is deleted, with an error that says so
    monkeypatch.setattr(data, 'SC09_SHA256', '0' * 64)
    with pytest.raises(data.DataError, match='sha256'):
        data.load('sc09', data_dir=str(tmp_path / 'other'))
    assert not os.path.exists(tmp_path / 'other' / 'speech_commands_v0.02.tar.gz.part')


def test_a_download_resumed_from_a_server_that_ignores_range_starts_the_file_again(tmp_path, monkeypatch,
                                                                                     range_server):
    """HTTP 200 to a Range request is the whole file: appended to the .part it would fail its checksum."""
    archive = bytes(range(256)) * 40
    monkeypatch.setattr(RangeServer, 'body', archive)
    monkeypatch.setattr(RangeServer, 'honours_range', False)
    dest = tmp_path / 'a.tar.gz'
    (tmp_path / 'a.tar.gz.part').write_bytes(archive[:1000])
    data._download(f'{range_server}/a.tar.gz', str(dest), hashlib.sha256(archive).hexdigest())
    assert RangeServer.ranges == ['bytes=1000-'] and dest.read_bytes() == archive


def test_an_extraction_cut_short_leaves_sc09_whole_or_absent_or_says_what_is_missing(tiny, tmp_path, monkeypatch):
    """Into a new folder: one rename, so a run killed there leaves it whole or absent (it was a move
    each, and one digit folder moved was taken as the whole set). Into a folder that was there already: a
    move each, and a run killed between them leaves part of SC09, which the next load names, saying how
    to start again."""
    archive = tmp_path / 'speech_commands_v0.02.tar.gz'
    archive.write_bytes(make_archive(tiny[0]))
    moves, real_replace = [], os.replace

    def replace(src, dst):
        moves.append(dst)
        if len(moves) == 2 and interrupt:
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', replace)
    interrupt = False
    data.extract_sc09(str(archive), str(tmp_path / 'new' / 'sc09'))
    assert moves == [str(tmp_path / 'new' / 'sc09')] and os.listdir(tmp_path / 'new') == ['sc09']
    assert sorted(os.listdir(tmp_path / 'new' / 'sc09')) == sorted([*data.DIGITS, *data.SC09_LISTS.values()])
    moves.clear()
    interrupt = True
    (tmp_path / 'sc09').mkdir()
    with pytest.raises(KeyboardInterrupt):
        data.extract_sc09(str(archive), str(tmp_path / 'sc09'))
    assert len(os.listdir(tmp_path / 'sc09')) == 1
    with pytest.raises(data.DataError, match=r'missing list file .*cut short, remove .*sc09 to extract it again'):
        data.load('sc09', data_dir=str(tmp_path))

@pytest.mark.parametrize('kind', ['dotdot', 'absolute', 'symlink', 'hardlink', 'fifo', 'device'])
def test_extraction_refuses_members_that_escape_the_target(tiny, tmp_path, kind):
    """Paths out of the target, links (symbolic or hard) and special files, each inside a digit folder."""
    info = tarfile.TarInfo({'dotdot': '../evil', 'absolute': str(tmp_path / 'evil')}.get(kind, f'zero/{kind}.wav'))
    if kind in ('symlink', 'hardlink'):
        info.type, info.linkname = {'symlink': tarfile.SYMTYPE, 'hardlink': tarfile.LNKTYPE}[kind], '../../evil'
    elif kind in ('fifo', 'device'):
        info.type = {'fifo': tarfile.FIFOTYPE, 'device': tarfile.CHRTYPE}[kind]
    else:
        info.size = 5
    (tmp_path / 'a.tar.gz').write_bytes(make_archive(tiny[0], [info]))
    (tmp_path / 'target').mkdir()
    with pytest.raises(data.DataError, match=re.escape(repr(info.name))):
        data.extract_sc09(str(tmp_path / 'a.tar.gz'), str(tmp_path / 'target' / 'sc09'))
    assert sorted(os.listdir(tmp_path)) == ['a.tar.gz', 'target'] and os.listdir(tmp_path / 'target') == []


# ------------------------------------------------------------------------------------------------
# Module hygiene

def test_data_py_imports_only_numpy_and_the_standard_library():
    tree = ast.parse(open(os.path.join(HERE, 'data.py')).read())
    modules = {alias.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules - set(sys.stdlib_module_names) == {'numpy', 'espeakng_loader'}
    code = 'import sys, data; assert "jax" not in sys.modules and "espeakng_loader" not in sys.modules'
    subprocess.run([sys.executable, '-c', code], cwd=HERE, check=True)
