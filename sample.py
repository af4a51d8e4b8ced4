"""Generate audio from a trained Poolformer with the recurrent sampler.

    python sample.py --checkpoint runs/digits --n 16 --out runs/digits/more

One jitted lax.scan over pf.step: every layer keeps its state, and level k runs (lax.cond inside
pf.step) only once every F_1*..*F_k tokens, so a token costs about what one token of a parallel
forward pass costs. (The thesis author's sampler re-evaluated each 160-token segment 160 times.)
Writes OUT/sample_XXX.wav (16-bit, decoded with the dataset's own encoding), OUT/samples.json
(each clip's NLL under the model, in bits per generated sample) and OUT/spectrograms.png.
"""
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint
import data
import metrics
import pf


def filter_logits(logits, temperature, top_p):
    """The distribution the sampler draws from: logits / temperature, then nucleus (top-p) filtering,
    which keeps the smallest set of most likely tokens whose probability reaches top_p."""
    logits = logits / temperature
    if top_p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, -1), -1)
    outside = jnp.cumsum(sorted_probs, -1) - sorted_probs >= top_p  # mass before this token already >= p
    drop = jnp.zeros_like(outside).at[jnp.arange(logits.shape[0])[:, None], order].set(outside)
    return jnp.where(drop, -jnp.inf, logits)


def generate(params, cfg, key, prompt, prompt_len, temperature=1.0, top_p=1.0, dtype="float32"):
    """prompt (B, S) tokens, of which the first prompt_len are teacher-forced; the rest are sampled.
    -> tokens (B, S), log p(token) (B, S) under the model itself (temperature 1, no filtering).
    dtype: the compute dtype (pf.DTYPES)."""
    dtype = pf.DTYPES[dtype]
    params = pf.compute_params(params, dtype)  # cast once, not at every token (step's own cast is then a no-op)
    batch, length = prompt.shape

    def body(carry, inputs):
        state, prev = carry
        t, forced = inputs
        logits, state = pf.step(params, state, prev, cfg, dtype)  # (B, V) float32
        drawn = jax.random.categorical(jax.random.fold_in(key, t), filter_logits(logits, temperature, top_p))
        token = jnp.where(t < prompt_len, forced, drawn).astype(prev.dtype)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], -1)[:, 0]
        return (state, token), (token, logp)

    start = (pf.init_state(cfg, batch, length, dtype), jnp.full((batch,), pf.SILENCE, jnp.int32))
    _, (tokens, logp) = jax.lax.scan(body, start, (jnp.arange(length), prompt.T.astype(jnp.int32)))
    return tokens.T, logp.T


def prompt_tokens(path, encoding, length):
    """A WAV file -> its tokens (at most length - 1 of them, so at least one token is sampled)."""
    audio, rate = data.read_wav(path)
    if rate != data.SAMPLE_RATE:
        audio = data.resample(audio, rate, data.SAMPLE_RATE)
    audio = audio[: length - 1]
    if encoding == "bytes":  # the inverse of how write_samples plays a bytes model's tokens: t / 127.5 - 1
        tokens = np.clip(np.rint((audio.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    else:
        tokens = data.encode(audio, encoding)
    return tokens, len(tokens)


def digit_guesses(meta, audio, rate):
    """(digit word, probability) per clip from the dataset's digit classifier when there is one
    (metrics.find_classifier), else None."""
    if "train" not in meta or rate != metrics.SAMPLE_RATE:
        return None
    folder = metrics.find_classifier(meta["data"]["name"], meta["train"]["data_dir"])
    if folder is None:
        return None
    params, _, _ = metrics.load_classifier(folder)
    _, probs = metrics.classify(params, metrics.mel_features(audio))
    return [(data.DIGITS[k], float(p[k])) for k, p in zip(probs.argmax(1), probs)]


def parse_args(argv=None):
    parser = data.Parser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="a train.py run folder (best.npz, else newest) or .npz")
    parser.add_argument("--n", type=int, default=16, help="clips to write")
    parser.add_argument("--out", required=True, help="folder for the WAVs, samples.json and spectrograms.png")
    parser.add_argument("--seq-len", type=int, help="tokens per clip (default: the training length)")
    parser.add_argument("--seed", type=int, default=0, help="sampling randomness")
    parser.add_argument("--temperature", type=float, default=1.0, help="divides the logits before sampling")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                        "whose probability reaches this (1 = no filtering)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips sampled at once")
    parser.add_argument("--dtype", choices=sorted(pf.DTYPES), default="float32",
                        help="compute dtype (as train.py --dtype)")
    parser.add_argument("--prompt", help="a WAV to continue: its tokens are teacher-forced, then sampling goes on")
    parser.add_argument("--generate", type=int, help="generate this many clips and keep the --n most likely "
                        "(SaShiMi sorts samples by likelihood); default: --n")
    args = parser.parse_args(argv)
    if args.temperature <= 0:
        raise SystemExit(f"error: --temperature {args.temperature} must be > 0")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"error: --top-p {args.top_p} must be in (0, 1]")
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} {value} must be >= 1")
    if args.generate is not None and args.generate < args.n:
        raise SystemExit(f"error: --generate {args.generate} must be at least --n {args.n}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.prompt and not os.path.isfile(args.prompt):
        raise SystemExit(f"error: --prompt {args.prompt}: no such WAV file")

    cfg, params, meta = checkpoint.load_model(args.checkpoint)
    encoding, length = meta["data"]["encoding"], args.seq_len or meta["data"]["seq_len"]
    try:
        cfg.check_length(length)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    prompt, prompt_len = np.full(length, pf.SILENCE, np.int32), 0
    if args.prompt:
        try:
            tokens, prompt_len = prompt_tokens(args.prompt, encoding, length)
        except data.WavError as e:
            raise SystemExit(f"error: {e}")
        prompt[:prompt_len] = tokens

    write_samples(cfg, params, meta, args.out, args.n, args.generate, args.seed, args.batch_size, args.dtype,
                  prompt, prompt_len, args.temperature, args.top_p, source=args.checkpoint, prompt_path=args.prompt)
    return 0


def write_samples(cfg, params, meta, out, n, generate_n=None, seed=0, batch_size=16, dtype="float32", prompt=None,
                  prompt_len=0, temperature=1.0, top_p=1.0, source=None, prompt_path=None):
    """Sample clips (generate_n of them, keeping the n most likely, else n) and write OUT/sample_XXX.wav,
    OUT/samples.json and OUT/spectrograms.png. -> the kept clips' audio (n, S)."""
    encoding, rate = meta["data"]["encoding"], meta["data"]["sample_rate"] or data.SAMPLE_RATE
    length = meta["data"]["seq_len"] if prompt is None else len(prompt)
    prompt = np.full(length, pf.SILENCE, np.int32) if prompt is None else prompt
    total = max(generate_n or n, n)
    run = jax.jit(lambda p, key, prompts: generate(p, cfg, key, prompts, prompt_len, temperature, top_p, dtype))
    print(f"sampling {total} clips of {length} tokens ({encoding}) from step {meta['step']}, batch {batch_size}")
    clips, logps, start = [], [], time.perf_counter()
    for i in range(0, total, batch_size):
        tokens, logp = run(params, jax.random.fold_in(jax.random.key(seed), i), np.tile(prompt, (batch_size, 1)))
        clips.append(np.asarray(tokens)[: total - i])
        logps.append(np.asarray(logp)[: total - i])
        done = min(i + batch_size, total)
        print(f"{done}/{total} clips | {done * length / (time.perf_counter() - start):.0f} tokens/s (incl. compile)")
    tokens, logp = np.concatenate(clips), np.concatenate(logps)
    nll_bits = -logp[:, prompt_len:].mean(1) / np.log(2)
    keep = np.argsort(nll_bits)[:n] if generate_n else np.arange(n)

    os.makedirs(out, exist_ok=True)
    stale = [f for f in os.listdir(out) if re.fullmatch(r"sample_\d+\.wav|metrics\.json", f)]
    for f in stale:  # an earlier draw's clips and scores: metrics.py evaluate would score every WAV here
        os.remove(os.path.join(out, f))
    if stale:
        print(f"removed {len(stale)} earlier files from {out} (its WAVs, metrics.json)")
    audio = data.decode(tokens[keep], encoding) if encoding != "bytes" else tokens[keep] / 127.5 - 1
    records, labels = [], []
    guesses = digit_guesses(meta, audio, rate)
    for j, (i, clip) in enumerate(zip(keep, audio)):
        name = f"sample_{j:03d}.wav"
        data.write_wav(os.path.join(out, name), clip, rate)
        records.append({"file": name, "nll_bits": float(nll_bits[i]), "index": int(i)})
        labels.append(f"#{j}: {nll_bits[i]:.2f} bits/sample")
        if guesses:
            records[-1]["digit"], records[-1]["digit_prob"] = guesses[j]
            labels[-1] += f"\nheard '{guesses[j][0]}' {guesses[j][1]:.0%}"
    with open(os.path.join(out, "samples.json"), "w") as f:
        json.dump({"checkpoint": source, "step": meta["step"], "seed": seed, "temperature": temperature,
                   "top_p": top_p, "prompt": prompt_path, "prompt_tokens": prompt_len, "samples": records}, f, indent=1)
    title = f"{len(keep)} samples, step {meta['step']}" + (": NLL, classifier's digit" if guesses else ": NLL")
    mark = prompt_len / rate if prompt_len else None  # a prompt's end, dashed on every tile
    metrics.save_figure(metrics.figure_spectrograms(audio, rate, labels, title, mark), os.path.join(out, "spectrograms.png"))
    print(f"wrote {len(keep)} WAVs, samples.json (mean NLL {nll_bits[keep].mean():.3f} bits) and "
          f"spectrograms.png to {out}")
    return audio


def quality_report(run_dir, n=64, batch_size=64, dtype="float32", seed=0):
    """The end of a training run on spoken digits: n clips from the run's best EMA weights into
    RUN/samples/, then one row of test NLL, FID, IS, mIS and AM beside the held-out clips' row
    (metrics.evaluate_samples, exactly what `metrics.py evaluate` computes). None, with a note, when
    the dataset has no digit classifier."""
    cfg, params, meta = checkpoint.load_model(run_dir)
    classifier = metrics.find_classifier(meta["data"]["name"], meta["train"]["data_dir"])
    if classifier is None or (meta["data"]["sample_rate"] or data.SAMPLE_RATE) != metrics.SAMPLE_RATE:
        print(f"no digit classifier for {meta['data']['name']}: no quality report "
              f"(python metrics.py train-classifier --dataset {meta['data']['name']} makes one)")
        return None
    out = os.path.join(run_dir, "samples")
    write_samples(cfg, params, meta, out, n, seed=seed, batch_size=min(batch_size, n), dtype=dtype, source=run_dir)
    return metrics.evaluate_samples(out, classifier, run_dir, dtype)


if __name__ == "__main__":
    sys.exit(main())
