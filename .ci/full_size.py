"""One leg of the full-size learning run on a lent GPU: the thesis' baseline (pf.Config(), 7.27M
parameters) with the thesis' recipe (train.py --preset sc09: AdamW lr 0.002, 1000 warmup steps, batch 32,
EMA 0.999) in bf16, on the built-in digits, for a wall-clock budget; then 64 samples from the best EMA
weights and their quality row under the shipped classifier. What comes back fits a lent machine's limits
(8 files of at most 16 MiB): the log, the config, the quality row, the curves, the spectrogram grid, the
64 WAVs packed, and the EMA weights in float32 split in two, from which the next leg continues.

    python .ci/full_size.py --out $OUT --minutes 5                      # a leg on a GPU (about 9 minutes in all)
    python .ci/full_size.py --out /tmp/leg --minutes 0.2 --tiny         # the same path on a CPU, a tiny model

The next leg: carry the last leg's ema-*.npz in .full/ (`carry: [".full"]`); the run warm-starts from
them (fresh AdamW, its warmup again: the parameters and AdamW's two moments would be three more copies of
the weights to carry). The wheels a bare machine lacks (espeakng-loader) travel in .whl/ and are installed
first. The thesis' 1000 warmup steps take about 5 minutes on an H200 (281 ms a step) and more on an H100,
so a 5-minute leg is all warmup; `--warmup` shortens it (not the thesis' recipe, say so where its results
are reported).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--pooling", "2", "4", "--layers", "1", "0", "0", "--d-model", "16", "--d-rnn", "64", "--batch-size", "4",
        "--size", "tiny", "--seq-len", "1600", "--warmup", "5", "--eval-clips", "8", "--report-samples", "4"]
MAX_BYTES = 15 * 2**20  # under the 16 MiB a file may have to come back


def run(command, env):
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where the leg's files go (a lent machine's $OUT)")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget, compile and evaluations included")
    p.add_argument("--warmup", type=int, default=1000, help="AdamW warmup steps (the thesis': 1000)")
    p.add_argument("--run", default="runs/full", help="the train.py run folder")
    p.add_argument("--warm", default=".full", help="a folder with the previous leg's ema-*.npz (if any)")
    p.add_argument("--data-dir", default="data", help="where the built-in digits are built")
    p.add_argument("--eval-every", type=int, default=200, help="steps between evaluations (curves.png)")
    p.add_argument("--tiny", action="store_true", help="a tiny model on the tiny built-in set: the CPU check")
    a = p.parse_args(argv)
    if not a.minutes > 0:
        p.error(f"--minutes {a.minutes} must be > 0")
    return a


def main(argv=None):
    a = parse_args(argv)
    files = 6 + len(weight_parts(ema_sizes(*(TINY if a.tiny else []))))  # checked before a GPU's minutes go
    if files > 8:
        raise SystemExit(f"error: {files} files would come back; a lent machine returns 8")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if wheels:  # a machine without a package registry: the carried wheels, into a folder of their own
        site = os.path.join("/tmp", "full-size-site")
        run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site, *wheels], env)
        env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")])
    warm = sorted(glob.glob(os.path.join(ROOT, a.warm, "ema-*.npz")))
    train = [sys.executable, "train.py", "--dataset", "sc09-espeak", "--preset", "sc09", "--dtype", "bfloat16",
             "--minutes", str(a.minutes), "--out", a.run, "--data-dir", a.data_dir, "--eval-every", str(a.eval_every),
             "--eval-clips", "128", "--warmup", str(a.warmup),
             "--resume", *(["--warm-start", *warm] if warm else []), *(TINY if a.tiny else [])]
    run(train, env)
    pack(os.path.join(ROOT, a.run), a.out)
    return 0


def ema_sizes(*model_flags):
    """The byte sizes of the model's weights, in checkpoint order, from train.py's own flags (no arrays)."""
    sys.path.insert(0, ROOT)
    import jax
    import checkpoint
    import pf
    import train
    cfg, _ = train.parse_args(["--dataset", "sc09-espeak", "--preset", "sc09", *model_flags])
    shapes = jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))
    return [s.size * s.dtype.itemsize for s in checkpoint.flatten({"ema": shapes}).values()]


def weight_parts(sizes):
    import checkpoint  # (ROOT is on the path: ema_sizes put it there)
    return checkpoint.plan_parts(sizes, MAX_BYTES)


def pack(run_dir, out):
    """The leg's files, at most 8, each under 16 MiB: log.jsonl, config.json, metrics.json, curves.png,
    spectrograms.png, samples.tar (the WAVs and samples.json), ema-1of2.npz and ema-2of2.npz."""
    sys.path.insert(0, ROOT)
    import checkpoint  # noqa: E402 (after the wheels are in place)
    os.makedirs(out, exist_ok=True)
    samples = os.path.join(run_dir, "samples")
    for src, name in (("log.jsonl", "log.jsonl"), ("config.json", "config.json"), ("curves.png", "curves.png"),
                      ("samples/metrics.json", "metrics.json"), ("samples/spectrograms.png", "spectrograms.png")):
        if os.path.exists(os.path.join(run_dir, src)):
            shutil.copy(os.path.join(run_dir, src), os.path.join(out, name))
    with tarfile.open(os.path.join(out, "samples.tar"), "w") as tar:
        for f in sorted(os.listdir(samples)):
            if f.endswith((".wav", ".json")):
                tar.add(os.path.join(samples, f), arcname=f"samples/{f}")
    # the newest checkpoint's EMA (the run's end, where the next leg goes on; best.npz may be older)
    path, meta, arrays = checkpoint.first_readable(reversed(checkpoint.checkpoints(run_dir)))
    paths = checkpoint.save_parts(os.path.join(out, "ema"), {k: v for k, v in arrays.items() if k.startswith("ema/")},
                                  meta, MAX_BYTES)
    files = sorted(os.listdir(out))
    print(f"packed {len(files)} files in {out}: {', '.join(files)}")
    assert len(files) <= 8 and all(os.path.getsize(os.path.join(out, f)) < 16 * 2**20 for f in files), files
    return paths


if __name__ == "__main__":
    sys.exit(main())
