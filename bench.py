"""Performance, measured as ratios side by side in one run (this machine is shared and noisy).

    python bench.py --quick     # a few minutes: short sequences, batch 1
    python bench.py             # the issue's sizes: 16,000 samples, thesis batch with accumulation

Every part runs in a fresh subprocess (`--part NAME`), so its peak memory (max RSS) is its own.
Prints a table and writes bench.json. Model FLOPs are counted from the architecture (count_flops):
2 x multiply-adds of every dense, gate and pooling matmul and the head, per token at each level's
rate; a training step is 3x the forward (forward + backward); the recomputation of rematerialised
ResBlocks and elementwise work (the scan, norms, activations) are not counted. test_bench.py checks
the count against the matmuls JAX traces. MFU = counted FLOPs per second / the matmul peak (part
`matmul`, a 2048^3 float32 matmul).

The training steps behind the ratios (VARIANTS) are compiled in one process and timed in alternation,
5 rounds, medians (a slow spell of this shared machine hits them alike):
- no_pooling: the thesis' no-pooling model (pooling [], layers [36]); pooling_speedup = its step time
  over the baseline's.
- fixes_off: the baseline with this project's CPU fixes switched off (pf.SCAN_CHUNK = 1, i.e. the plain
  associative scan, and XLA's default CPU fusions); speedup_over_fixes_off. The first landing was
  slower still: it also drew each dropout mask inside the remat (twice per step).
- matmul_only: the ceiling. The baseline step with nothing but its matmuls (strip_to_matmuls: the same
  matmul shapes, remat and layer scans; norms, GELU, dropout and the RG-LRU's decay and scan removed).
  The model cannot run faster than its matmuls alone, so matmul_only_mfu bounds mfu for any elementwise
  code, however good, short of changing how XLA runs the matmuls.

mlp_block_mfu / temporal_block_mfu: one ResBlock of each kind alone (part `block`), its counted FLOPs
per second over the matmul peak. The MLP block has nothing but matmuls, LayerNorm and GELU, so its figure
is what XLA makes of the model's simplest piece over a whole sequence: at 16,000 tokens its arrays
outgrow the cache (at --quick's 3,200 it is ~1.7x higher).
"""
import contextlib
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

BASELINE = {}  # pf.Config() defaults are the thesis baseline
NO_POOLING = {"pooling": (), "layers": (36,)}  # thesis table 4.2: same 36 RG-LRU layers, no pooling
VARIANTS = {"baseline": {}, "no_pooling": {"model": NO_POOLING}, "fixes_off": {"before": True},
            "matmul_only": {"matmul_only": True}}  # the training steps timed side by side (part_train)


def block_macs(cfg):
    """Multiply-adds per token of one ResBlock of each kind, and of a level's two pooling convs."""
    d, r = cfg.d_model, cfg.d_rnn
    n = r // 2 if cfg.complex_rnn else r
    gate = lambda width: d * width if cfg.gated else 0
    return {"temporal": d * r + 2 * r * n // 32 + r * d + gate(d) + d * d,
            "attention": d * d + 2 * d * (d // 4) + d * d + d * d + gate(d) + d * d,  # q, k v, o, own gate
            "mlp": d * 2 * d + gate(2 * d) + 2 * d * d,
            "pool": 2 * d * (d // cfg.n_groups)}  # down and up, per fine token


def count_flops(cfg):
    """Forward FLOPs per input token (see the module docstring for what is counted)."""
    m = block_macs(cfg)
    macs, rate = cfg.d_model * cfg.vocab, 1.0
    for level, layers in enumerate(cfg.layers):
        deepest = level == len(cfg.pooling)
        per_layer = m["attention" if deepest and cfg.deepest == "attention" else "temporal"] + m["mlp"]
        macs += rate * (layers if deepest else 2 * layers) * per_layer
        if not deepest:
            macs += rate * m["pool"]
            rate /= cfg.pooling[level]
    return 2 * macs


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def timed(fn, *args, repeats=3, options=None):
    """(compile seconds, median seconds per call after compiling)."""
    import jax
    start = time.perf_counter()
    compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, float(np.median(times))


# ---------------------------------------------------------------- parts (each in its own process)


def part_matmul(a):
    import jax
    import jax.numpy as jnp
    n = 2048
    x = jax.random.normal(jax.random.key(0), (n, n))
    _, s = timed(lambda x: x @ x, x, repeats=5)
    return {"matmul_peak_gflops": 2 * n**3 / s / 1e9}


def strip_to_matmuls(pf, cfg, set_attr):
    """The matmul-only ceiling: patch pf so the model keeps every matmul (dense, block-diagonal gate,
    pooling, head: the same shapes, remat and layer scans) and nothing else. Norms and GELU become
    identities, the RG-LRU returns its two gates' matmuls in place of the decay and the scan, and
    dropout is off. Its loss is meaningless (it overflows); its time is what XLA takes for the matmuls
    and the layout work they need. set_attr(obj, name, value) makes each patch (one that restores it:
    `patches` or pytest's monkeypatch.setattr). Returns the config to run."""
    import jax
    import jax.numpy as jnp

    def rglru(p, x, complex_rnn):
        r, i = pf.block_diagonal(p["gate_a"], x), pf.block_diagonal(p["gate_x"], x)
        return jnp.concatenate([r, i], -1) if complex_rnn else r + i  # (S, B, R) like the real output

    set_attr(pf, "norm", lambda p, x, kind: x)
    set_attr(pf, "rglru", rglru)
    set_attr(jax.nn, "gelu", lambda x: x)  # pf calls jax.nn.gelu (part_train restores it)
    return dataclasses.replace(cfg, dropout=0.0)


@contextlib.contextmanager
def patches():
    """set_attr(obj, name, value) inside the block; every attribute is restored on leaving it."""
    undo = []

    def set_attr(obj, name, value):
        undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)
    try:
        yield set_attr
    finally:
        for obj, name, value in reversed(undo):
            setattr(obj, name, value)


def part_train(a):
    """Training steps (batch a.batch x a.seq_len), one per variant in a.variants, each compiled under
    its own patches, then timed in alternation (round r times every variant once), so slow spells
    of this shared machine hit them alike and their ratios hold. Variant keys: model (Config
    changes), before (CPU fixes off), matmul_only (strip_to_matmuls)."""
    import jax
    import pf
    import train
    from jax.sharding import Mesh
    mesh = Mesh(np.array(jax.devices()), ("data",))
    tc = train.TrainConfig(batch_size=a.batch, microbatch=a.microbatch)
    tokens = np.random.default_rng(0).integers(0, 256, (a.batch, a.seq_len), dtype=np.uint8)
    mask = np.ones_like(tokens, bool)
    runs = []
    for v in json.loads(a.variants):
        cfg = pf.Config(**v.get("model", {}))
        with patches() as set_attr:
            if v.get("before"):  # fixes off: the plain associative scan, XLA's default CPU fusions
                set_attr(pf, "SCAN_CHUNK", 1)
                set_attr(train, "compiler_options", lambda: None)
            if v.get("matmul_only"):
                cfg = strip_to_matmuls(pf, cfg, set_attr)
            state = jax.jit(lambda: train.init_state(cfg, tc))()
            start = time.perf_counter()
            compiled = train.make_train_step(cfg, tc, mesh).lower(state, tokens, mask).compile()
            compile_s = time.perf_counter() - start
        state, m = compiled(state, tokens, mask)
        jax.block_until_ready(m)
        runs.append({"cfg": cfg, "step": compiled, "state": state, "compile_s": compile_s, "times": []})
    for _ in range(a.repeats):
        for run in runs:
            start = time.perf_counter()
            run["state"], m = run["step"](run["state"], tokens, mask)
            jax.block_until_ready(m)
            run["times"].append(time.perf_counter() - start)
    n_tokens, out = a.batch * a.seq_len, []
    for run in runs:
        s = float(np.median(run["times"]))
        out.append({"ms_per_step": 1000 * s, "tokens_per_s": n_tokens / s, "compile_s": run["compile_s"],
                    "model_gflops_per_step": 3 * count_flops(run["cfg"]) * n_tokens / 1e9,
                    "params": pf.count_params(run["state"]["params"])})
    out[0]["peak_mem_gib"] = peak_gib()  # of the whole process: the first variant's alone if it is the only one
    return out


def part_block(a):
    """One ResBlock of each kind alone, forward + backward as in pf.layer_stack (remat, a dropout
    mask drawn outside it), at the full rate: its counted FLOPs per second. The
    MLP block is matmuls, LayerNorm, GELU and dropout only; the step mixes it with the costlier
    temporal block."""
    import jax
    import jax.numpy as jnp
    import pf
    import train
    cfg = pf.Config(**json.loads(a.model))
    x = jax.random.normal(jax.random.key(0), (a.seq_len, a.batch, cfg.d_model))
    keep = pf.dropout_mask(jax.random.key(2), cfg.dropout, x.shape)
    out = {}
    for kind, branch in (("mlp", pf.mlp_branch), ("temporal", pf.temporal_branch(cfg))):
        p = pf.res_block_init(jax.random.key(1), cfg, "mlp" if kind == "mlp" else "rglru", 1.0)
        block = jax.checkpoint(lambda p, x, branch=branch: pf.res_block(p, x, cfg, branch, keep)[0])
        grad = jax.grad(lambda p, x: jnp.sum(block(p, x) ** 2), (0, 1))
        _, s = timed(grad, p, x, repeats=5, options=train.compiler_options())
        out[f"{kind}_block_ms"] = 1000 * s
        out[f"{kind}_block_gflops_per_s"] = 3 * 2 * block_macs(cfg)[kind] * x.shape[0] * x.shape[1] / s / 1e9
    return out


def part_scan(a):
    import jax
    import jax.numpy as jnp
    import pf
    shape = (16000, a.batch, 128)  # S, B, N: the baseline's R = 256 complex channels at 16 kHz
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    mag = jax.random.uniform(k1, shape, minval=0.9, maxval=0.999)
    a_ = mag * jnp.exp(1j * jax.random.uniform(k2, shape, maxval=0.3))
    b_ = jax.random.normal(k3, shape) + 0j
    out = {}
    plain = lambda a, b: pf.scan_associative(a, b, chunk=1)
    for name, scan in (("assoc", pf.scan_associative), ("plain", plain), ("seq", pf.scan_sequential)):
        loss = lambda a, b: jnp.sum(jnp.abs(scan(a, b)) ** 2)
        _, out[name] = timed(jax.value_and_grad(loss, (0, 1)), a_.astype(jnp.complex64), b_.astype(jnp.complex64))
    return {"scan_assoc_ms": 1000 * out["assoc"], "scan_plain_assoc_ms": 1000 * out["plain"],
            "scan_seq_ms": 1000 * out["seq"], "scan_assoc_over_seq": out["assoc"] / out["seq"]}


def part_sampler(a):
    import jax
    import jax.numpy as jnp
    import pf
    import sample
    cfg = pf.Config(**json.loads(a.model))
    params = jax.jit(pf.init, static_argnums=1)(jax.random.key(0), cfg)
    prompt = jnp.full((a.batch, a.seq_len), pf.SILENCE, jnp.int32)
    _, fwd = timed(lambda p, x: pf.apply(p, x, cfg), params, prompt, repeats=2)
    _, smp = timed(lambda p, k: sample.generate(p, cfg, k, prompt, 0), params, jax.random.key(1), repeats=1)
    tokens = a.batch * a.seq_len
    return {"sampler_tokens_per_s": tokens / smp, "forward_tokens_per_s": tokens / fwd,
            "sampler_over_forward": fwd / smp, "sample_s": smp, "sample_batch": a.batch, "sample_len": a.seq_len}


def part_data(a):
    import data
    data.load("sc09-espeak", a.data_dir, "default")  # make sure the WAVs exist (built once)
    root = os.path.join(a.data_dir, "sc09-espeak")
    with tempfile.TemporaryDirectory() as cache_home:  # a fresh cache: the first load reads every WAV
        start = time.perf_counter()
        ds = data.load("sc09-espeak", cache_home, path=root)
        wav_s = time.perf_counter() - start
        start = time.perf_counter()
        data.load("sc09-espeak", cache_home, path=root)
        cached_s = time.perf_counter() - start
    clips = len(ds.train) + len(ds.validation) + len(ds.test)
    return {"data_clips_per_s": clips / wav_s, "data_cached_reload_s": cached_s, "data_clips": clips,
            "sc09_full_from_wavs_s": 38908 / (clips / wav_s), "sc09_full_from_cache_s": cached_s * 38908 / clips}


PARTS = {"matmul": part_matmul, "train": part_train, "block": part_block, "scan": part_scan, "sampler": part_sampler, "data": part_data}


def run_part(name, **kw):
    argv = [sys.executable, os.path.abspath(__file__), "--part", name]
    for k, v in kw.items():
        flag = f"--{k.replace('_', '-')}"
        argv += [flag] if v is True else [flag, json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
    print(f"... {name} {kw}", flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    import data  # its Parser
    import pf  # to check --model before any part runs
    p = data.Parser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="shorter sequences, no thesis-batch step (a few minutes)")
    p.add_argument("--out", default="bench.json", help="the JSON results file")
    p.add_argument("--data-dir", default="data", help="datasets live here (the data part reads the built-in digits)")
    p.add_argument("--part", choices=sorted(PARTS), help="internal: run one part, JSON on stdout")
    p.add_argument("--model", default="{}", help="--part: pf.Config changes as JSON, e.g. '{\"d_model\": 64}'")
    p.add_argument("--batch", type=int, default=1, help="--part: batch size")
    p.add_argument("--microbatch", type=int, help="--part train: rows per microbatch (default: the whole batch)")
    p.add_argument("--seq-len", type=int, default=16000, help="--part: tokens per row")
    p.add_argument("--repeats", type=int, default=2, help="--part: timed repeats (the median is reported)")
    p.add_argument("--variants", default="[{}]", help="--part train: JSON list, see part_train")
    a = p.parse_args(argv)
    for flag, text in (("--model", a.model), ("--variants", a.variants)):
        try:
            json.loads(text)
        except ValueError as e:
            raise SystemExit(f"error: {flag} {text!r} is not JSON ({e})")
    try:
        cfg = pf.Config(**json.loads(a.model))
        if min(a.batch, a.seq_len, a.repeats, a.microbatch or 1) < 1:
            raise ValueError(f"--batch {a.batch}, --seq-len {a.seq_len}, --repeats {a.repeats} and --microbatch "
                             f"{a.microbatch} must be >= 1")
        cfg.check_length(a.seq_len)
    except (ValueError, TypeError) as e:  # bad JSON, unknown or invalid Config fields, bad numbers
        raise SystemExit(f"error: {e}")
    if a.part:
        print(json.dumps(PARTS[a.part](a)))
        return 0

    length = 3200 if a.quick else 16000
    r = {"quick": a.quick, "seq_len": length}
    r.update(run_part("matmul"))
    alone = (run_part("train", batch=1, seq_len=length) or [{}])[0]  # peak memory: the baseline step alone
    side = run_part("train", variants=list(VARIANTS.values()), batch=1, seq_len=length, repeats=5)
    side = dict(zip(VARIANTS, side)) if side else {}
    base, nopool, before, ceiling = (side.get(k) for k in VARIANTS)
    r["train_baseline_alone"], r["train_side_by_side"] = alone, side
    r.update(run_part("block", model=BASELINE, batch=1, seq_len=length))
    r.update(run_part("scan", batch=1))
    r.update(run_part("sampler", model=BASELINE, batch=16, seq_len=320 if a.quick else 1600))
    r.update(run_part("data", data_dir=a.data_dir))
    if not a.quick:  # the thesis batch, 32 x 16,000, with accumulation
        r["train_thesis_batch"] = (run_part("train", batch=32, microbatch=1, seq_len=16000, repeats=1) or [None])[0]
        # 16 one-second clips with the baseline, extrapolated from the sampler's measured rate
        r["sample_16_clips_s"] = 16 * 16000 / r["sampler_tokens_per_s"] if "sampler_tokens_per_s" in r else None

    get = lambda d, k: d.get(k) if d else None
    peak = r.get("matmul_peak_gflops")
    of_peak = lambda gflops: gflops / peak if gflops and peak else None
    rate = lambda d: d["model_gflops_per_step"] / (d["ms_per_step"] / 1000) if d else None
    gflops = rate(base)
    summary = {
        "train_tokens_per_s": get(base, "tokens_per_s"),
        "mfu": of_peak(gflops),
        "model_gflops_per_s": gflops,
        "matmul_only_mfu": of_peak(rate(ceiling)),
        "mlp_block_mfu": of_peak(r.get("mlp_block_gflops_per_s")),
        "temporal_block_mfu": of_peak(r.get("temporal_block_gflops_per_s")),
        "matmul_peak_gflops": peak,
        "pooling_speedup": nopool["ms_per_step"] / base["ms_per_step"] if base and nopool else None,
        "pooling_flop_ratio": nopool["model_gflops_per_step"] / base["model_gflops_per_step"] if base and nopool else None,
        "speedup_over_fixes_off": before["ms_per_step"] / base["ms_per_step"] if base and before else None,
        "scan_assoc_over_seq": r.get("scan_assoc_over_seq"),
        "sampler_over_forward": r.get("sampler_over_forward"),
        "peak_mem_gib": get(r.get("train_thesis_batch"), "peak_mem_gib") or get(alone, "peak_mem_gib"),
        "compile_s": get(alone, "compile_s"),
        "data_clips_per_s": r.get("data_clips_per_s"),
    }
    result = {**summary, "details": r, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
              "python": platform.python_version()}, "command": " ".join(["python", "bench.py"] + (argv or sys.argv[1:]))}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'measure':28s} value")
    for k, v in summary.items():
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    print(f"(details in {a.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
