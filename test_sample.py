"""sample.py: the sampler draws from pf.apply's distributions, is seeded, and writes valid audio."""
import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint
import data
import pf
import sample
import train

CFG = pf.Config(pooling=(2, 3), layers=(1, 1, 1), d_model=16, d_rnn=64, dropout=0.0, scale=0.5)
LENGTH = 24


@pytest.fixture(scope="module")
def params():
    return pf.init(jax.random.key(0), CFG)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, params):
    """A run folder as train.py writes it, holding an untrained (but not trivial) model."""
    out = str(tmp_path_factory.mktemp("run"))
    meta = {"model": dataclasses.asdict(CFG), "step": 0, "epoch": 0, "best_val": None,
            "data": {"name": "sc09-espeak", "encoding": "mu-law", "sample_rate": 16000, "seq_len": LENGTH}}
    train.save_checkpoint(os.path.join(out, "best.npz"), {"ema": params}, meta)
    return out


def model_logp(params, tokens):
    logits = jax.jit(pf.apply, static_argnames="cfg")(params, tokens, CFG)
    return np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens)[..., None], -1)[..., 0]


def assert_drawn_from(tokens, p):
    """tokens (n, length) drawn with conditionals p (n, length, V): every token whose expected count
    at a position is >= 20 is drawn as often as expected, and the drawn tokens' mean probability is
    sum_v p_v^2, as for draws from p itself; each within 5 standard errors. -> p of each drawn token."""
    drawn = np.eye(p.shape[-1])[np.asarray(tokens)]  # (n, length, V) one-hot
    expected, var = p.sum(0), (p * (1 - p)).sum(0)  # per position and token
    z_counts = np.abs(drawn.sum(0) - expected)[expected >= 20] / np.sqrt(var[expected >= 20])
    assert z_counts.size > 20 and z_counts.max() < 5, z_counts.max()
    p_drawn, sum_p2 = (drawn * p).sum(-1), (p**2).sum(-1)
    z_sharp = (p_drawn - sum_p2).sum() / np.sqrt(((p**3).sum(-1) - sum_p2**2).sum())
    assert abs(z_sharp) < 5, z_sharp
    return p_drawn


def test_free_running_sampler_draws_from_the_parallel_forward_distribution(params):
    """2048 sampled sequences of 6 tokens, judged by pf.apply's conditionals p(. | sampled prefix):
    (1) every token whose expected count is >= 20 at a position is drawn as often as expected;
    (2) the mean probability of the drawn tokens is sum_v p_v^2, as for draws from p itself (a
    flatter or sharper distribution, or p of another position, moves it: temperature 1.1 is 7 standard
    errors off); (3) repeats of the previous token. Each within 5 standard errors. The sampler's own
    log-probabilities equal apply's."""
    n, length = 2048, 6
    tokens, logp = jax.jit(lambda k: sample.generate(params, CFG, k, jnp.zeros((n, length), jnp.int32), 0))(
        jax.random.key(1))
    assert len(np.unique(np.asarray(tokens))) > 100  # really sampled, not a constant
    p = np.asarray(jax.nn.softmax(jax.jit(pf.apply, static_argnames="cfg")(params, tokens, CFG)), np.float64)
    p_drawn = assert_drawn_from(tokens, p)
    # (3) a token repeats its predecessor as often as p gives the predecessor (each step draws afresh: noise
    # reused across steps would repeat the last token far more often, with every marginal still right)
    tokens_np = np.asarray(tokens)
    p_repeat = np.take_along_axis(p[:, 1:], tokens_np[:, :-1, None], -1)[..., 0]  # p_t(x_(t-1) | prefix)
    repeats = (tokens_np[:, 1:] == tokens_np[:, :-1]).sum()
    z_repeat = (repeats - p_repeat.sum()) / np.sqrt((p_repeat * (1 - p_repeat)).sum())
    assert abs(z_repeat) < 5, z_repeat
    np.testing.assert_allclose(logp, np.log(p_drawn), atol=2e-5)


def test_tempered_nucleus_sampler_draws_from_filter_logits_of_the_parallel_forward(params):
    """At temperature 0.6 and top-p 0.9, 2048 sequences of 6 tokens, judged by the distribution
    filter_logits makes of pf.apply's logits (filter_logits itself is checked by hand below): no token
    outside the nucleus is drawn, and the counts and mean probability are those of q (assert_drawn_from).
    A sampler that swaps the two knobs, or ignores either, fails."""
    n, length, t, top_p = 2048, 6, 0.6, 0.9
    tokens, _ = jax.jit(lambda k: sample.generate(params, CFG, k, jnp.zeros((n, length), jnp.int32), 0,
                                                  temperature=t, top_p=top_p))(jax.random.key(5))
    logits = jax.jit(pf.apply, static_argnames="cfg")(params, tokens, CFG)
    q = np.asarray(jax.nn.softmax(sample.filter_logits(logits.reshape(-1, CFG.vocab), t, top_p)), np.float64)
    q_drawn = assert_drawn_from(tokens, q.reshape(n, length, CFG.vocab))
    assert q_drawn.min() > 0  # nothing from outside the nucleus


def test_teacher_forced_sampler_reproduces_the_prompt_and_its_probabilities(params):
    x = jax.random.randint(jax.random.key(2), (2, LENGTH), 0, 256)
    tokens, logp = sample.generate(params, CFG, jax.random.key(3), x, LENGTH)
    np.testing.assert_array_equal(tokens, x)
    np.testing.assert_allclose(logp, model_logp(params, x), atol=2e-5)


def test_filter_logits_matches_temperature_and_nucleus_by_hand():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12)) * 2, jnp.float32)
    t, p = 0.7, 0.8
    got = np.asarray(jax.nn.softmax(sample.filter_logits(logits, t, p)))
    for row, probs in zip(np.asarray(logits), got):
        q = np.exp(row / t - np.max(row / t))
        q /= q.sum()
        order = np.argsort(-q)
        kept = order[: np.searchsorted(np.cumsum(q[order]), p) + 1]  # smallest prefix reaching p
        expected = np.zeros_like(q)
        expected[kept] = q[kept] / q[kept].sum()
        np.testing.assert_allclose(probs, expected, atol=1e-6)
    # and the sampler's draws follow it
    draws = jax.random.categorical(jax.random.key(0), sample.filter_logits(logits, t, p), shape=(20000, 2))
    freq = np.stack([np.bincount(np.asarray(draws[:, i]), minlength=12) / 20000 for i in range(2)])
    np.testing.assert_allclose(freq, got, atol=0.015)
    # top_p 1 keeps every token, even of a confident distribution whose float32 cumsum reaches 1 early
    confident = jnp.zeros((1, 256)).at[0, 7].set(30.0)
    np.testing.assert_array_equal(np.asarray(sample.filter_logits(confident, 0.5, 1.0)), np.asarray(confident) / 0.5)


def read_clips(out):
    with open(os.path.join(out, "samples.json")) as f:
        records = json.load(f)["samples"]
    return records, [data.read_wav(os.path.join(out, r["file"])) for r in records]


def test_same_seed_same_samples_different_seed_different_samples(run_dir, tmp_path):
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        outs[name] = str(tmp_path / name)
        assert sample.main(["--checkpoint", run_dir, "--n", "3", "--batch-size", "2", "--out", outs[name],
                            "--seed", str(seed)]) == 0
    wav = lambda name, i: open(os.path.join(outs[name], f"sample_{i:03d}.wav"), "rb").read()
    assert all(wav("a", i) == wav("b", i) for i in range(3))
    assert all(wav("a", i) != wav("c", i) for i in range(3))
    assert len({wav("a", i) for i in range(3)}) == 3  # clips differ within a batch and across batches


def test_wavs_are_16khz_mono_16bit_of_the_right_length_and_decode_the_tokens(run_dir, tmp_path, params):
    out = str(tmp_path / "s")
    assert sample.main(["--checkpoint", run_dir, "--n", "2", "--out", out, "--seed", "5"]) == 0
    records, clips = read_clips(out)
    assert len(records) == 2
    for r, (audio, rate) in zip(records, clips):
        raw = open(os.path.join(out, r["file"]), "rb").read()
        assert rate == 16000 and raw[22:24] == b"\x01\x00" and raw[34:36] == b"\x10\x00"  # mono, 16-bit
        assert audio.shape == (LENGTH,)
    # the same tokens, regenerated directly, decode to the written audio (within 16-bit rounding)
    key = jax.random.fold_in(jax.random.key(5), 0)
    tokens, logp = jax.jit(lambda k: sample.generate(params, CFG, k, jnp.full((16, LENGTH), 128), 0))(key)
    for i, (audio, _) in enumerate(clips):
        np.testing.assert_allclose(audio, data.decode(np.asarray(tokens[i]), "mu-law"), atol=2 / 32768)
        assert abs(records[i]["nll_bits"] + float(np.mean(logp[i])) / np.log(2)) < 1e-4
    png = open(os.path.join(out, "spectrograms.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # drawn again into the same folder, fewer: no earlier clip (nor the scores of them) is left to be scored
    open(os.path.join(out, "metrics.json"), "w").write("{}")
    assert sample.main(["--checkpoint", run_dir, "--n", "1", "--out", out, "--seed", "6"]) == 0
    assert sorted(os.listdir(out)) == ["sample_000.wav", "samples.json", "spectrograms.png"]
    with open(os.path.join(out, "samples.json")) as f:  # replaced, not appended to
        again = json.load(f)
    assert again["seed"] == 6 and [r["file"] for r in again["samples"]] == ["sample_000.wav"]


def test_temperature_and_top_p_reach_the_sampler_as_given(run_dir, tmp_path, params):
    """sample.py --temperature 0.7 --top-p 0.9: the WAVs are the tokens generate draws with those two
    (each in its own place: the two are both floats in (0, 1]), and samples.json records them."""
    out = str(tmp_path / "tempered")
    assert sample.main(["--checkpoint", run_dir, "--n", "2", "--out", out, "--seed", "5",
                        "--temperature", "0.7", "--top-p", "0.9"]) == 0
    with open(os.path.join(out, "samples.json")) as f:
        assert {k: v for k, v in json.load(f).items() if k in ("temperature", "top_p")} == {"temperature": 0.7, "top_p": 0.9}
    key = jax.random.fold_in(jax.random.key(5), 0)
    tokens, _ = jax.jit(lambda k: sample.generate(params, CFG, k, jnp.full((16, LENGTH), 128), 0, 0.7, 0.9))(key)
    clips = read_clips(out)[1]
    assert len(clips) == 2
    for i, (audio, _) in enumerate(clips):
        np.testing.assert_allclose(audio, data.decode(np.asarray(tokens[i]), "mu-law"), atol=2 / 32768)


def test_prompt_is_continued_and_likelihood_sorting_keeps_the_best(run_dir, tmp_path, monkeypatch):
    prompt = np.sin(np.arange(10) / 2.0).astype(np.float32) * 0.5
    data.write_wav(str(tmp_path / "prompt.wav"), prompt)
    out = str(tmp_path / "p")
    drawn, figure = [], sample.metrics.figure_spectrograms
    monkeypatch.setattr(sample.metrics, "figure_spectrograms", lambda *a: drawn.append(a) or figure(*a))
    assert sample.main(["--checkpoint", run_dir, "--n", "2", "--generate", "6", "--out", out,
                        "--prompt", str(tmp_path / "prompt.wav")]) == 0
    records, clips = read_clips(out)
    wavs = ["sample_000.wav", "sample_001.wav"]  # named by rank, the best first, whichever of the 6 they were
    assert sorted(f for f in os.listdir(out) if f.endswith(".wav")) == wavs == [r["file"] for r in records]
    assert [r["index"] for r in records] != [0, 1]  # (the case tells a rank from a generation index)
    # spectrograms.png: the kept clips, each tile titled with its NLL, the prompt's end marked
    (audio, rate, labels, _, mark), = drawn
    np.testing.assert_allclose(audio, [a for a, _ in clips], atol=2 / 32768)
    assert rate == 16000 and mark == 10 / 16000
    assert labels == [f"#{j}: {r['nll_bits']:.2f} bits/sample" for j, r in enumerate(records)]
    expected = data.decode(data.encode(data.read_wav(str(tmp_path / "prompt.wav"))[0], "mu-law"), "mu-law")
    for audio, _ in clips:
        np.testing.assert_allclose(audio[:10], expected, atol=2 / 32768)
    nll = [r["nll_bits"] for r in records]
    assert len(nll) == 2 and nll == sorted(nll)
    with open(os.path.join(out, "samples.json")) as f:
        assert json.load(f)["prompt_tokens"] == 10
    # the same 6 clips (same seed), all kept: the 2 kept above are the 2 lowest NLLs of the 6
    everything = str(tmp_path / "all")
    assert sample.main(["--checkpoint", run_dir, "--n", "6", "--generate", "6", "--out", everything,
                        "--prompt", str(tmp_path / "prompt.wav")]) == 0
    generated = {r["index"]: r["nll_bits"] for r in read_clips(everything)[0]}
    assert sorted(generated) == list(range(6)) and len(set(generated.values())) == 6
    lowest = sorted(generated, key=generated.get)[:2]
    assert [r["index"] for r in records] == lowest and nll == [generated[i] for i in lowest]


def test_sequence_length_must_fit_the_pooling(run_dir, tmp_path):
    with pytest.raises(SystemExit, match="not divisible by the pooling product 2\\*3 = 6"):
        sample.main(["--checkpoint", run_dir, "--n", "1", "--out", str(tmp_path), "--seq-len", "25"])


def test_log_probabilities_are_the_models_own_at_any_temperature_and_top_p(params):
    """samples.json's NLL and --generate's ranking rate a clip under the model itself, not under the
    tempered, nucleus-filtered distribution it was drawn from."""
    tokens, logp = jax.jit(lambda k: sample.generate(params, CFG, k, jnp.zeros((4, LENGTH), jnp.int32), 0,
                                                     temperature=0.6, top_p=0.7))(jax.random.key(4))
    np.testing.assert_allclose(logp, model_logp(params, tokens), atol=2e-5)


def test_a_clips_nll_is_the_mean_over_its_generated_tokens_only(run_dir, tmp_path, params):
    """A 10-token prompt, 14 generated: each clip's NLL in samples.json is -mean log2 p of the 14."""
    prompt = np.full(LENGTH, pf.SILENCE, np.int32)
    prompt[:10] = np.arange(10) * 25
    cfg, p, meta = checkpoint.load_model(run_dir)
    out = str(tmp_path / "nll")
    sample.write_samples(cfg, p, meta, out, 2, batch_size=2, prompt=prompt, prompt_len=10)
    _, logp = sample.generate(params, CFG, jax.random.fold_in(jax.random.key(0), 0), np.tile(prompt, (2, 1)), 10)
    want = -np.asarray(logp)[:, 10:].mean(1) / np.log(2)
    np.testing.assert_allclose([r["nll_bits"] for r in read_clips(out)[0]], want, rtol=1e-5)
    # one clip (--n 1): a batch axis of 1 is kept, and the WAV holds the whole clip
    one = sample.write_samples(cfg, p, meta, str(tmp_path / "one"), 1, batch_size=1, prompt=prompt, prompt_len=10)
    records, clips = read_clips(str(tmp_path / "one"))
    assert one.shape == (1, LENGTH) and len(records) == 1 and clips[0][0].shape == (LENGTH,)


def test_a_prompt_is_resampled_to_16khz_and_cut_to_leave_a_token_to_sample(tmp_path):
    path = str(tmp_path / "p.wav")
    audio = (0.5 * np.sin(2 * np.pi * 440 * np.arange(80) / 8000)).astype(np.float32)
    data.write_wav(path, audio, 8000)
    tokens, n = sample.prompt_tokens(path, "mu-law", 1000)
    resampled = data.resample(data.read_wav(path)[0], 8000, 16000)
    assert n == len(resampled) == 160
    np.testing.assert_array_equal(tokens, data.encode(resampled, "mu-law"))
    tokens, n = sample.prompt_tokens(path, "mu-law", 100)  # longer than the clip: all but the last token
    assert n == len(tokens) == 99


@pytest.mark.parametrize("encoding,rate", [("linear", 16000), ("bytes", 0)])
def test_clips_are_decoded_with_the_runs_own_encoding(params, tmp_path, encoding, rate):
    """A linear-coded run (Beethoven) decodes with the linear code; a byte-stream run (no sample rate)
    writes its bytes as 16 kHz audio, byte / 127.5 - 1."""
    meta = {"step": 0, "data": {"name": "x", "encoding": encoding, "sample_rate": rate, "seq_len": LENGTH}}
    out = str(tmp_path / encoding)
    sample.write_samples(CFG, params, meta, out, 2, batch_size=2)
    tokens, _ = sample.generate(params, CFG, jax.random.fold_in(jax.random.key(0), 0),
                                jnp.full((2, LENGTH), pf.SILENCE, jnp.int32), 0)
    tokens = np.asarray(tokens)
    want = data.decode(tokens, "linear") if encoding == "linear" else tokens / 127.5 - 1
    clips = read_clips(out)[1]
    assert len(clips) == 2
    for (audio, got_rate), expected in zip(clips, want):
        assert got_rate == 16000
        np.testing.assert_allclose(audio, expected, atol=2 / 32768)


def test_digit_guesses_are_each_clips_most_likely_digit(monkeypatch):
    """From the classifier of the run's own dataset in the run's data folder (here only real SC09 has
    one: a guess by the built-in digits' classifier would be another model's)."""
    probs = np.full((3, 10), 0.01)
    probs[0, 7], probs[1, 2], probs[2, 9] = 0.91, 0.6, 0.55
    monkeypatch.setattr(sample.metrics, "find_classifier",
                        lambda name, data_dir: "cls" if (name, data_dir) == ("sc09", "/runs/data") else None)
    monkeypatch.setattr(sample.metrics, "load_classifier", lambda folder: (None, None, None))
    monkeypatch.setattr(sample.metrics, "classify", lambda params, images: (None, probs))
    meta = {"train": {"data_dir": "/runs/data"}, "data": {"name": "sc09"}}
    guesses = sample.digit_guesses(meta, np.zeros((3, 16000), np.float32), 16000)
    assert guesses == [("seven", 0.91), ("two", 0.6), ("nine", 0.55)]
    builtin = {"train": {"data_dir": "/runs/data"}, "data": {"name": "sc09-espeak"}}
    assert sample.digit_guesses(builtin, np.zeros((3, 16000), np.float32), 16000) is None  # it has none here
    assert sample.digit_guesses(meta, np.zeros((3, 16000), np.float32), 8000) is None  # not the classifier's rate


def test_the_end_of_run_report_samples_the_best_ema_with_the_runs_dtype_and_seed_then_scores_them(
        tmp_path, params, monkeypatch):
    """sample.quality_report (what train.py ends with), its sampler and scorer stood in for: the run's
    best EMA weights are sampled with the dtype and seed asked for, into RUN/samples, then scored there
    with the dataset's classifier in the same dtype."""
    out = str(tmp_path)
    meta = {"model": dataclasses.asdict(CFG), "step": 4, "train": {"data_dir": "somewhere"},
            "data": {"name": "sc09-espeak", "encoding": "mu-law", "sample_rate": 16000, "seq_len": LENGTH}}
    train.save_checkpoint(os.path.join(out, "best.npz"), {"ema": params}, meta)
    calls = {}
    monkeypatch.setattr(sample.metrics, "find_classifier", lambda name, data_dir: f"classifier of {name} in {data_dir}")
    monkeypatch.setattr(sample, "write_samples", lambda *a, **k: calls.update(write=(a, k)))
    monkeypatch.setattr(sample.metrics, "evaluate_samples", lambda *a: calls.update(evaluate=a) or "the row")
    assert sample.quality_report(out, n=5, batch_size=64, dtype="bfloat16", seed=3) == "the row"
    (cfg, got, _, folder, n), kw = calls["write"]
    assert (cfg, folder, n) == (CFG, os.path.join(out, "samples"), 5)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)))
    assert kw == {"seed": 3, "batch_size": 5, "dtype": "bfloat16", "source": out}
    assert calls["evaluate"] == (folder, "classifier of sc09-espeak in somewhere", out, "bfloat16")


def test_each_written_clips_digit_is_the_guess_for_that_clip(run_dir, tmp_path, monkeypatch, capsys):
    """With --generate 8 --n 3 the 3 most likely clips are written; samples.json gives each WAV the
    classifier's guess for that WAV, not for the clip generated at its place, and the mean NLL printed is
    the kept clips'. The classifier is stood in for by a function of the audio it is given (its
    loudness), so the test needs no 16 kHz model."""
    loudness = lambda audio: np.abs(audio).sum(-1)
    monkeypatch.setattr(sample, "digit_guesses",
                        lambda meta, audio, rate: [("seven", float(v)) for v in loudness(np.asarray(audio))])
    cfg, p, meta = checkpoint.load_model(run_dir)
    out = str(tmp_path / "kept")
    sample.write_samples(cfg, p, meta, out, 3, generate_n=8, batch_size=8)
    records, clips = read_clips(out)
    assert [r["index"] for r in records] != [0, 1, 2]  # the kept clips are not the first three generated
    for r, (audio, _) in zip(records, clips):
        assert r["digit"] == "seven" and abs(r["digit_prob"] - loudness(audio)) < 0.01, (r, loudness(audio))
    printed = float(re.search(r"mean NLL ([0-9.]+) bits", capsys.readouterr().out).group(1))
    assert abs(printed - np.mean([r["nll_bits"] for r in records])) < 1e-3  # the 3 written, not all 8 drawn


@pytest.mark.parametrize("flags,words", [(["--temperature", "0"], "error: --temperature 0.0 must be > 0"),
                                          (["--top-p", "0"], "error: --top-p 0.0 must be in (0, 1]"),
                                          (["--generate", "1", "--n", "2"], "--generate 1 must be at least --n 2")])
def test_bad_sampling_flags_are_refused(flags, words):
    with pytest.raises(SystemExit, match=re.escape(words)):
        sample.parse_args(["--checkpoint", "x", "--out", "y", *flags])


def test_a_bytes_models_prompt_is_read_back_as_the_bytes_its_samples_are_played_from(tmp_path):
    """A model trained on a byte stream (--dataset bytes) writes its clips as tokens / 127.5 - 1; a WAV
    written that way, given back as --prompt, must give the same bytes (a uint8 cast of the float audio
    would give 0 for every sample below 1)."""
    tokens = np.array([0, 1, 64, 127, 128, 200, 254, 255], np.uint8)
    data.write_wav(str(tmp_path / "bytes.wav"), tokens / 127.5 - 1)
    got, n = sample.prompt_tokens(str(tmp_path / "bytes.wav"), "bytes", 100)
    assert n == 8 and got.dtype == np.uint8
    np.testing.assert_array_equal(got, tokens)


def test_a_corrupt_prompt_wav_ends_in_one_error_line_naming_it(run_dir, tmp_path):
    bad = tmp_path / "prompt.wav"
    bad.write_bytes(b"RIFF, but not audio")
    with pytest.raises(SystemExit, match=re.escape(f"error: {bad}") + ".*not a RIFF/WAVE file"):
        sample.main(["--checkpoint", run_dir, "--n", "1", "--out", str(tmp_path / "out"), "--prompt", str(bad)])
