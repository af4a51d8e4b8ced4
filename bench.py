"""Performance, measured as ratios side by side in one run (this machine is shared and noisy).

    python bench.py --quick     # a few minutes: short sequences, batch 1
    python bench.py             # the issue's sizes: 16,000 samples, thesis batch with accumulation
    python bench.py --device    # on a GPU/TPU: batch 32 x 16,000 in float32 and bf16, within --budget s
    python bench.py --device --quick   # the same parts with a tiny model (the CPU test of that path)

Every part runs in a fresh subprocess (`--part NAME`), so its peak memory (max RSS) is its own.
Prints a table and writes bench.json. Model FLOPs are counted from the architecture (count_flops):
2 x multiply-adds of every dense, gate and pooling matmul and the head, per token at each level's
rate; a training step is 3x the forward (forward + backward); the recomputation of rematerialised
ResBlocks, elementwise work (the scan, norms, activations), the attention ablation's scores and their
weighting of the values (quadratic in its level's length) and the zeros of the RG-LRU gates' dense
matmul (pf.block_diagonal: the model's FLOPs are its 32 blocks') are not counted. test_bench.py checks
the count against the matmuls JAX traces. MFU = counted FLOPs per second / the matmul peak (part
`matmul`, a 2048^3 float32 matmul).

Where the time goes: `python bench.py --part train ... --profile [--profile-dir DIR]` runs one step of
each variant under jax.profiler.trace and sums its kernels' device time by level, block, pass and
line of pf.py (profile_step); DIR keeps the first variant's trace, kernel list and compiled program.

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
import re
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
# --device: groups of training steps (--groups), each compiled and timed side by side in its own process.
# "core": the issue's table (both dtypes, with and without pooling; the default scan, pf.scan_chunk(), and
# the remat of pf.REMAT_POLICY). No remat at all for the whole batch is left out: at 32 x 16,000 it needs
# 147 GiB (XLA's estimate on an H200, where its rematerialisation pass then ran for minutes).
BF16 = {"dtype": "bfloat16"}
DEVICE_CORE = {"bf16": BF16, "f32": {}, "no_pooling_bf16": {**BF16, "model": NO_POOLING},
               "no_pooling_f32": {"model": NO_POOLING}}
# "tuning": against core's bf16, the RG-LRU gates as 32 batched block matmuls (the form before
# pf.block_diagonal's one dense matmul: 366 against 281 ms on an H200) and the "dots" remat policy. The
# blocked scan's chunks are swept on the scan alone (part `scan`): training steps with 16- or 256-step
# chunks did not finish compiling in 330 s on an H200 (four at once), and on the scan alone there the
# plain associative scan (pf.scan_chunk() on accelerators) is fastest: 7.4 ms against 11.1-11.7.
DEVICE_TUNING = {"gates_einsum": {**BF16, "gates": "einsum"}, "remat_dots": {**BF16, "remat": "dots"}}
# "memory" (not in the default --groups): no remat at all fits once the batch is accumulated in 4
# microbatches of 8 rows (147 GiB / 4: 37 GiB); micro8 keeps the remat, so the pair separates what the
# loop costs from what the remat costs. On an H100 the no-remat one measured 890 ms against 498 ms for the
# whole-batch remat step (both with 64-step scan blocks): together, the loop and no remat are 1.8x slower.
DEVICE_MEMORY = {"micro8": {**BF16, "microbatch": 8}, "micro8_no_remat": {**BF16, "microbatch": 8, "remat": "none"}}
DEVICE_GROUPS = {"core": DEVICE_CORE, "tuning": DEVICE_TUNING, "memory": DEVICE_MEMORY}
QUICK = {"core": ("bf16", "f32"), "tuning": ("remat_dots",),
         "memory": ("micro8", "micro8_no_remat")}  # --device --quick (the CPU test): fewer compiles
THESIS_TOKENS_PER_S = 31158 * 16000 * 11.45 / 3600  # thesis Table 4.2: 11.45 epochs/hour on a TPU v3-128 pod
TINY = {"pooling": (2,), "layers": (1, 1), "d_model": 32, "d_rnn": 64}  # --device --quick: the CPU test (one level: fewer compiles)
TINY_NO_POOLING = {**TINY, "pooling": (), "layers": (2,)}


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


# ---------------------------------------------------------------- profiles


def hlo_sources(hlo_text):
    """{instruction name: (op_name, "function:line")} from a compiled program's text: the metadata XLA
    keeps for every instruction (a fusion carries its root's), with the innermost stack frame it kept
    (JAX keeps the user's frames: for the model's ops a line of pf.py), so each kernel of a profile
    can be traced to the model's code."""
    def table(title, pattern):
        m = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", hlo_text, re.S | re.M)
        return re.findall(pattern, m.group(1), re.M) if m else []

    functions = dict(table("FunctionNames", r'^(\d+) "(.*)"$'))
    lines = {i: f"{functions.get(fn, '?')}:{line}"
             for i, fn, line in table("FileLocations", r"^(\d+) \{file_name_id=\d+ function_name_id=(\d+) line=(\d+)")}
    frames = dict(table("StackFrames", r"^(\d+) \{file_location_id=(\d+)"))
    out = {}
    for name, meta in re.findall(r"^\s*(?:ROOT )?%(\S+) = [^\n]*?metadata=\{([^}\n]*)\}", hlo_text, re.M):
        op = re.search(r'op_name="([^"]*)"', meta)
        frame = re.search(r"stack_frame_id=(\d+)", meta)
        out[name] = (op.group(1) if op else "", lines.get(frames.get(frame.group(1)), "?") if frame else "?")
    return out


def kernel_times(profile):
    """[(HLO instruction or kernel name, nanoseconds)] of every kernel in a jax.profiler trace: the
    device planes' stream lines on a GPU, else (a CPU) the host's events that name an HLO op. Only
    leaf events count: a CPU's while loop is an event spanning its body's (on a GPU's streams no two
    kernels overlap). On a CPU several threads run at once, so the sum can exceed the wall time."""
    device = [p for p in profile.planes if p.name.startswith("/device:")]
    out = []
    for plane in device or [p for p in profile.planes if p.name.startswith("/host:CPU")]:
        lines = [l for l in plane.lines if l.name.startswith("Stream")] or list(plane.lines)
        for line in lines:
            events = sorted(((float(ev.start_ns), float(ev.duration_ns), ev.name, dict(ev.stats).get("hlo_op"))
                             for ev in line.events), key=lambda e: (e[0], -e[1]))
            events = [e for e in events if device or e[3]]
            for (start, ns, name, op), after in zip(events, events[1:] + [None]):
                if after is None or after[0] >= start + ns:  # no event begins inside this one
                    out.append((str(op or name), ns))
    return out


def profile_step(step, args, hlo_text, top=25, keep_dir=None):
    """Run a compiled step once under jax.profiler.trace; sum its kernels' device time by level
    ("level<k>" scopes), block ("temporal"/"mlp"), pass ("fwd"; "recompute": the remat's forward
    again inside the backward pass; "bwd": the rest of the backward pass) and source line of pf.py.
    On a GPU, busy_ms over wall_ms says how much of the step the device spends computing (the rest:
    launches and gaps)."""
    import glob
    import jax
    from jax.profiler import ProfileData
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            wall = time.perf_counter() - start
        path = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)[0]
        kernels = kernel_times(ProfileData.from_file(path))
        if keep_dir:
            import shutil
            shutil.copy(path, os.path.join(keep_dir, "step.xplane.pb"))
    sources = hlo_sources(hlo_text)
    sums = {"level": {}, "block": {}, "pass": {}, "source": {}}
    rows = []
    for name, ns in kernels:
        op, line = sources.get(name, ("", "?"))  # a GPU's kernels name their HLO instruction (hlo_op)
        levels = re.findall(r"level(\d+)", op)
        block = next((b for b in ("temporal", "mlp") if f"/{b}/" in op or op.endswith(f"/{b}")), "other")
        keys = {"level": f"level{levels[-1]}" if levels else "other", "block": block,
                "pass": "recompute" if "rematted_computation" in op else "bwd" if "transpose(" in op else "fwd"}
        keys["source"] = f"{line} {keys['pass']}" if op else f"(no metadata) {name[:40]}"
        for k, v in keys.items():
            sums[k][v] = sums[k].get(v, 0.0) + ns / 1e6
        rows.append((name, ns, op, line))
    if keep_dir:
        import gzip
        with gzip.open(os.path.join(keep_dir, "kernels.tsv.gz"), "wt") as f:
            f.writelines(f"{n}\t{ns:.0f}\t{line}\t{op}\n" for n, ns, op, line in rows)
        with gzip.open(os.path.join(keep_dir, "step.hlo.txt.gz"), "wt") as f:
            f.write(hlo_text)
    order = lambda d, n=None: dict(sorted(((k, round(v, 3)) for k, v in d.items()), key=lambda kv: -kv[1])[:n])
    return {"wall_ms": 1000 * wall, "busy_ms": sum(ns for _, ns in kernels) / 1e6, "kernels": len(kernels),
            "attributed": sum(1 for n, _, op, _ in rows if op) / max(len(rows), 1),
            **{f"by_{k}": order(v, top if k == "source" else None) for k, v in sums.items()}}


# ---------------------------------------------------------------- parts (each in its own process)


def part_matmul(a):
    """The MFU denominator: an n^3 matmul (2048 float32 on the CPU; --device: 8192 bfloat16)."""
    import jax
    n = a.n or 2048
    x = jax.random.normal(jax.random.key(0), (n, n)).astype(a.dtype)
    _, s = timed(lambda x: x @ x, x, repeats=5)
    y = jax.random.normal(jax.random.key(1), (n, n * 4))  # float32: 1 GiB at n = 8192
    _, copy_s = timed(lambda y: y * 2.0 + 1.0, y, repeats=5)  # reads y once, writes once
    return {"matmul_peak_gflops": 2 * n**3 / s / 1e9, "matmul_n": n, "matmul_dtype": a.dtype,
            "bandwidth_gb_per_s": 2 * y.nbytes / copy_s / 1e9}


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


def block_diagonal_einsum(p, x):
    """The RG-LRU gates as pf computed them before: 32 small matmuls in one einsum (slower than
    pf.block_diagonal's one dense matmul, see there; the same values)."""
    import jax.numpy as jnp
    from einops import rearrange
    x = rearrange(x, "... (h i) -> ... h i", h=p["w"].shape[0])  # (..., 32, n_in/32)
    y = jnp.einsum("...hi,hio->...ho", x, p["w"])  # (..., 32, n_out/32)
    return rearrange(y, "... h o -> ... (h o)") + p["b"]


REMAT_POLICIES = {"input": None, "dots": "dots_with_no_batch_dims_saveable"}  # "none": pf.REMAT = False


def check_variant(v):
    """A ValueError for a part_train variant with an unknown key or value (a typo would time the default)."""
    allowed = {"model": None, "dtype": ("float32", "bfloat16"), "chunk": None, "scan": ("associative", "fused"),
               "gates": ("einsum",),
               "remat": (*REMAT_POLICIES, "none"), "microbatch": None, "before": (True, False),
               "matmul_only": (True, False)}
    for k, value in v.items():
        if k not in allowed or (allowed[k] and value not in allowed[k]):
            raise ValueError(f"variant {json.dumps(v)}: {k}={json.dumps(value)} is not known; the keys (and "
                             f"values): {', '.join(f'{n} {c}' if c else n for n, c in allowed.items())}")


def part_train(a):
    """Training steps (batch a.batch x a.seq_len), one per variant in a.variants, each compiled under
    its own patches, then timed in alternation (round r times every variant once), so slow spells
    of this shared machine hit them alike and their ratios hold. Variant keys: model (Config
    changes), dtype (train --dtype), chunk (pf.SCAN_CHUNK; 1 is the plain associative scan), scan (pf.SCAN:
    associative | fused, the Pallas kernel), gates
    ("einsum": the RG-LRU's block-diagonal gates as batched block matmuls, block_diagonal_einsum), remat
    (a REMAT_POLICIES key, or "none": no remat), microbatch (rows per microbatch), before (CPU fixes
    off), matmul_only (strip_to_matmuls). A variant that
    fails to compile or run (out of memory, say) reports its error and the others go on. Each variant
    is traced under its patches, then all compile at once in threads (XLA compiles outside the GIL):
    compile_s is wall time while the others compile too."""
    import jax
    import pf
    import train
    from concurrent.futures import ThreadPoolExecutor
    from jax.sharding import Mesh
    mesh = Mesh(np.array(jax.devices()), ("data",))
    tokens = np.random.default_rng(0).integers(0, 256, (a.batch, a.seq_len), dtype=np.uint8)
    mask = np.ones_like(tokens, bool)
    runs = []
    for v in json.loads(a.variants):
        cfg = pf.Config(**v.get("model", {}))
        tc = train.TrainConfig(batch_size=a.batch, microbatch=v.get("microbatch", a.microbatch),
                               dtype=v.get("dtype", "float32"))
        run = {"variant": v, "times": []}
        runs.append(run)
        try:
            with patches() as set_attr:
                if v.get("before"):  # fixes off: the plain associative scan, XLA's default CPU fusions
                    set_attr(pf, "SCAN_CHUNK", 1)
                    set_attr(train, "compiler_options", lambda: None)
                if v.get("chunk"):
                    set_attr(pf, "SCAN_CHUNK", v["chunk"])
                if v.get("scan"):  # the RG-LRU's training scan: associative, or the fused Pallas kernel
                    set_attr(pf, "SCAN", v["scan"])
                if v.get("gates") == "einsum":  # the RG-LRU gates as 32 batched block matmuls (before)
                    set_attr(pf, "block_diagonal", block_diagonal_einsum)
                if v.get("remat") == "none":
                    set_attr(pf, "REMAT", False)
                if REMAT_POLICIES.get(v.get("remat")):
                    set_attr(pf, "REMAT_POLICY", getattr(jax.checkpoint_policies, REMAT_POLICIES[v["remat"]]))
                if v.get("matmul_only"):
                    cfg = strip_to_matmuls(pf, cfg, set_attr)
                state = jax.jit(lambda: train.init_state(cfg, tc))()
                start = time.perf_counter()
                run["lowered"] = train.make_train_step(cfg, tc, mesh).lower(state, tokens, mask, np.float32(1))
                run.update(cfg=cfg, state=state, trace_s=time.perf_counter() - start,
                           params=pf.count_params(state["params"]))
        except Exception as e:  # noqa: BLE001 -- report it, time the rest
            run["error"] = f"{type(e).__name__}: {str(e)[:300]}"

    def compile_one(run):
        start = time.perf_counter()
        try:
            run["compiled"] = run.pop("lowered").compile()
            run["hbm_gb"] = hbm_gb(run["compiled"])
        except Exception as e:  # noqa: BLE001
            run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        run["compile_s"] = time.perf_counter() - start
        print(f"compiled {json.dumps(run['variant'])} in {run['compile_s']:.0f} s", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(min(4, len(runs))) as pool:  # more at once slowed an H100 host's compiles
        list(pool.map(compile_one, [run for run in runs if "lowered" in run]))
    for run in runs:
        try:
            if "compiled" in run:
                run["step"] = run.pop("compiled")
                run["state"], m = run["step"](run["state"], tokens, mask, np.float32(1))
                run.update(memory_gib=executable_gib(run["step"]), loss_bits=float(m["loss_bits"]))
        except Exception as e:  # noqa: BLE001 -- e.g. out of device memory: report it, time the rest
            run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            run.pop("state", None)
        print(json.dumps({k: run.get(k) for k in ("variant", "trace_s", "compile_s", "memory_gib", "loss_bits", "error")}),
              file=sys.stderr, flush=True)
    for _ in range(a.repeats):
        for run in runs:
            if "step" in run:
                start = time.perf_counter()
                run["state"], m = run["step"](run["state"], tokens, mask, np.float32(1))
                jax.block_until_ready(m)
                run["times"].append(time.perf_counter() - start)
    for run in runs:
        if run["times"]:
            print(f"{json.dumps(run['variant'])}: {1000 * np.median(run['times']):.1f} ms/step", file=sys.stderr, flush=True)
    if a.profile:  # last: the step donates the state it is given
        keep = a.profile_dir  # for the first variant that runs
        for run in (run for run in runs if "step" in run):
            try:
                if keep:
                    os.makedirs(keep, exist_ok=True)
                run["profile"] = profile_step(run["step"], (run["state"], tokens, mask, np.float32(1)),
                                              run["step"].as_text(), keep_dir=keep)
            except Exception as e:  # noqa: BLE001 -- keep the timings
                run["profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            keep = None
    n_tokens, out = a.batch * a.seq_len, []
    for run in runs:
        if "step" not in run:
            out.append({"variant": run["variant"], "error": run.get("error")})
            continue
        s = float(np.median(run["times"]))
        out.append({"variant": run["variant"], "ms_per_step": 1000 * s, "timed_steps": len(run["times"]),
                    "tokens_per_s": n_tokens / s, "trace_s": run["trace_s"], "compile_s": run["compile_s"],
                    "memory_gib": run["memory_gib"], "loss_bits": run["loss_bits"], "hbm_gb_per_step": run["hbm_gb"],
                    "model_gflops_per_step": 3 * count_flops(run["cfg"]) * n_tokens / 1e9,
                    "params": run["params"], **({"profile": run["profile"]} if "profile" in run else {})})
    out[0]["peak_mem_gib"] = peak_gib()  # of the whole process: the first variant's alone if it is the only one
    out[0]["device_peak_gib"] = device_peak_gib()
    return out


def executable_gib(compiled):
    """Device memory one compiled step needs: its arguments, outputs and temporaries (XLA's own
    accounting; donated arguments are counted once)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes) / 2**30


def hbm_gb(compiled):
    """XLA's cost model: GB the step reads and writes in memory (over the device's bandwidth: the time a
    step bound by memory traffic would take)."""
    try:
        c = compiled.cost_analysis()
        c = c[0] if isinstance(c, list) else c
        return c.get("bytes accessed", 0.0) / 1e9 or None
    except Exception:  # noqa: BLE001 -- not every backend has it
        return None


def device_peak_gib():
    """Peak device memory of this process so far, where the backend reports it (GPU, TPU)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


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
    x = jax.random.normal(jax.random.key(0), (a.seq_len, a.batch, cfg.d_model)).astype(a.dtype)
    keep = pf.dropout_mask(jax.random.key(2), cfg.dropout, x.shape)
    out = {}
    for kind, branch in (("mlp", pf.mlp_branch), ("temporal", pf.temporal_branch(cfg))):
        p = pf.compute_params(pf.res_block_init(jax.random.key(1), cfg, "mlp" if kind == "mlp" else "rglru", 1.0),
                              a.dtype)
        block = jax.checkpoint(lambda p, x, branch=branch: pf.res_block(p, x, cfg, branch, keep)[0])
        grad = jax.grad(lambda p, x: jnp.sum(block(p, x).astype(jnp.float32) ** 2), (0, 1))
        _, s = timed(grad, p, x, repeats=5, options=train.compiler_options())
        out[f"{kind}_block_ms"] = 1000 * s
        out[f"{kind}_block_gflops_per_s"] = 3 * 2 * block_macs(cfg)[kind] * x.shape[0] * x.shape[1] / s / 1e9
    return out


def part_scan(a):
    import jax
    import jax.numpy as jnp
    import pf
    shape = (a.seq_len, a.batch, 128)  # S, B, N: the baseline's R = 256 complex channels (16,000 steps)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    mag = jax.random.uniform(k1, shape, minval=0.9, maxval=0.999)
    a_ = mag * jnp.exp(1j * jax.random.uniform(k2, shape, maxval=0.3))
    b_ = jax.random.normal(k3, shape) + 0j
    out = {}
    chunked = lambda k: lambda a, b: pf.scan_associative(a, b, chunk=k)
    default = "plain" if pf.scan_chunk() == 1 else f"chunk_{pf.scan_chunk()}"  # the training path's scan
    sweep = (16, 64, 256) if a.device else ()
    scans = {"plain": chunked(1), **{f"chunk_{k}": chunked(k) for k in sweep}, "seq": pf.scan_sequential}
    if a.device:  # the Pallas kernel (on a CPU interpreted: the path is exercised, its time means nothing)
        scans["fused"] = lambda a, b: pf.scan_fused(a, b, jnp.zeros_like(b[0]))
    scans.setdefault(default, pf.scan_associative)  # each scan compiled and timed once
    for name, scan in scans.items():
        loss = lambda a, b: jnp.sum(jnp.abs(scan(a, b)) ** 2)
        _, out[name] = timed(jax.value_and_grad(loss, (0, 1)), a_.astype(jnp.complex64), b_.astype(jnp.complex64))
    out["assoc"] = out.pop(default) if not a.device and default != "plain" else out[default]
    # The memory-bound time: forward and backward together must read a, b (forward), a, the cotangent and h
    # (backward) and write h, both gradients: 8 arrays of S x B x N complex64, at the bandwidth of a copy
    # of the same size measured here.
    nbytes = 8 * a_.size * 8
    _, copy_s = timed(lambda y: y * 2.0 + 1.0, a_.astype(jnp.complex64), repeats=5)  # reads once, writes once
    bandwidth = 2 * a_.size * 8 / copy_s
    return {"scan_assoc_ms": 1000 * out["assoc"], "scan_plain_assoc_ms": 1000 * out["plain"],
            "scan_seq_ms": 1000 * out["seq"], "scan_assoc_over_seq": out["assoc"] / out["seq"],
            **({"scan_fused_ms": 1000 * out["fused"]} if "fused" in out else {}), "scan_bytes_per_call": nbytes,
            "scan_copy_gb_per_s": bandwidth / 1e9, "scan_memory_bound_ms": 1000 * nbytes / bandwidth,
            **{f"scan_{k}_ms": 1000 * v for k, v in out.items() if k.startswith("chunk_")}}


def part_sampler(a):
    import jax
    import jax.numpy as jnp
    import pf
    import sample
    cfg = pf.Config(**json.loads(a.model))
    params = jax.jit(pf.init, static_argnums=1)(jax.random.key(0), cfg)
    prompt = jnp.full((a.batch, a.seq_len), pf.SILENCE, jnp.int32)
    dtype = jnp.dtype(a.dtype)
    _, fwd = timed(lambda p, x: pf.apply(p, x, cfg, dtype=dtype), params, prompt, repeats=2)
    _, smp = timed(lambda p, k: sample.generate(p, cfg, k, prompt, 0, dtype=a.dtype), params, jax.random.key(1),
                   repeats=1)
    tokens = a.batch * a.seq_len
    return {"sampler_tokens_per_s": tokens / smp, "forward_tokens_per_s": tokens / fwd,
            "sampler_over_forward": fwd / smp, "sample_s": smp, "sample_batch": a.batch, "sample_len": a.seq_len,
            "sample_dtype": a.dtype}


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


def run_part(name, timeout=None, **kw):
    """One part in a fresh process: its JSON result ({} if it failed or ran past timeout seconds)."""
    argv = [sys.executable, os.path.abspath(__file__), "--part", name]
    for k, v in kw.items():
        flag = f"--{k.replace('_', '-')}"
        argv += [flag] if v is True else [flag, json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
    print(f"... {name} {kw}", flush=True)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        print(f"part {name} ran past {timeout:.0f} s; its output so far:\n{err[-3000:]}", file=sys.stderr)
        return {}
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    """The flags, checked before anything runs: one error line for bad JSON, Config fields or numbers."""
    import data  # its Parser
    import pf  # to check --model before any part runs
    p = data.Parser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="shorter sequences, no thesis-batch step (a few minutes); "
                   "with --device: a tiny model, for the CPU")
    p.add_argument("--device", action="store_true", help="the accelerator benchmark: batch 32 x 16,000, "
                   "float32 and bfloat16, scan chunk and remat sweep, pooling speedup, sampler")
    p.add_argument("--budget", type=float, default=480, help="--device: seconds for all parts together")
    p.add_argument("--groups", default="core,tuning", help="--device: the groups of training steps "
                   "to time, comma-separated (core: the issue's table; tuning: the gates' old form and remat; memory: "
                   "no remat over microbatches)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="--part matmul, block, sampler: the compute dtype")
    p.add_argument("--n", type=int, help="--part matmul: the matrix size (default 2048)")
    p.add_argument("--out", default="bench.json", help="the JSON results file")
    p.add_argument("--data-dir", default="data", help="datasets live here (the data part reads the built-in digits)")
    p.add_argument("--part", choices=sorted(PARTS), help="internal: run one part, JSON on stdout")
    p.add_argument("--model", default="{}", help="--part: pf.Config changes as JSON, e.g. '{\"d_model\": 64}'")
    p.add_argument("--batch", type=int, default=1, help="--part: batch size")
    p.add_argument("--microbatch", type=int, help="--part train: rows per microbatch (default: the whole batch)")
    p.add_argument("--seq-len", type=int, default=16000, help="--part: tokens per row")
    p.add_argument("--repeats", type=int, default=2, help="--part: timed repeats (the median is reported)")
    p.add_argument("--variants", default="[{}]", help="--part train: JSON list, see part_train")
    p.add_argument("--profile", action="store_true", help="--part train: profile one step of each variant "
                   "(device time by level, block, pass and line of pf.py; see profile_step); on a GPU the run's "
                   "timings are then taken with XLA's command buffers off")
    p.add_argument("--profile-dir", help="--profile: keep the first variant's trace, kernel list and compiled "
                   "program here")
    a = p.parse_args(argv)
    for flag, text in (("--model", a.model), ("--variants", a.variants)):
        try:
            json.loads(text)
        except ValueError as e:
            raise SystemExit(f"error: {flag} {text!r} is not JSON ({e})")
    try:
        pf.Config(**json.loads(a.model))
        if min(a.batch, a.seq_len, a.repeats, a.microbatch or 1) < 1:
            raise ValueError(f"--batch {a.batch}, --seq-len {a.seq_len}, --repeats {a.repeats} and --microbatch "
                             f"{a.microbatch} must be >= 1")
        if a.part == "train":  # the step's models must fit the sequence (the other parts run any length)
            for v in json.loads(a.variants):
                pf.Config(**v.get("model", {})).check_length(a.seq_len)
                check_variant(v)
        if (a.profile and a.part != "train") or (a.profile_dir and not a.profile):
            raise ValueError("--profile works with --part train, and --profile-dir with --profile")
    except (ValueError, TypeError) as e:  # bad JSON, unknown or invalid Config fields, bad numbers
        raise SystemExit(f"error: {e}")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.profile and "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
        # A GPU runs the step's kernels as CUDA graphs ("command buffers"), which a trace shows as one
        # event each: off, every kernel is seen and attributed (read when jax starts its backend, after
        # this). The step is a little slower so: 288 against 281 ms on an H200, in two runs.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    if a.part:
        print(json.dumps(PARTS[a.part](a)))
        return 0
    if a.device:
        return main_device(a, argv)

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


def main_device(a, argv):
    """python bench.py --device: the issue's accelerator table, each part in its own process, within
    a.budget seconds (a part still running then is stopped, the rest skipped); bench.json is
    rewritten after every part, so a stopped run keeps what it measured."""
    start = time.perf_counter()
    left = lambda: a.budget - (time.perf_counter() - start)
    batch, length = (2, 64) if a.quick else (32, 16000)
    base, no_pool = (TINY, TINY_NO_POOLING) if a.quick else (BASELINE, NO_POOLING)
    r = {"quick": a.quick, "batch": batch, "seq_len": length, "command": " ".join(["python", "bench.py"] + (argv or sys.argv[1:]))}

    def save():
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)

    def part(name, **kw):
        if left() < 10:
            print(f"skipped {name}: the --budget of {a.budget:.0f} s is spent", file=sys.stderr)
            return {}
        print(f"[{a.budget - left():.0f} s]", end=" ")
        return run_part(name, timeout=left(), **kw)

    groups = [g for g in dict.fromkeys(a.groups.split(",")) if g]
    unknown = set(groups) - set(DEVICE_GROUPS)
    if unknown or not groups:
        raise SystemExit(f"error: --groups {a.groups!r}: choose one or more of {', '.join(DEVICE_GROUPS)}, "
                         f"comma-separated")
    r["matmul"] = part("matmul", dtype="bfloat16", n=256 if a.quick else 8192)
    if "core" in groups:
        r["matmul_f32"] = part("matmul", dtype="float32", n=256 if a.quick else 8192)
    save()
    for group in groups:
        variants = DEVICE_GROUPS[group]
        if a.quick:
            variants = {k: {**v, "microbatch": 1} if "microbatch" in v else v
                        for k, v in variants.items() if k in QUICK[group]}
        resolved = [{**v, "model": {**base, **(no_pool if "model" in v else {})}} for v in variants.values()]
        out = part("train", variants=resolved, batch=batch, seq_len=length, repeats=a.repeats)
        r[group] = dict(zip(variants, out)) if out else {}
        save()
        if group == "core":
            for b in (16,) if a.quick else (16, 256):  # --quick (the CPU test): one batch, one compile
                r[f"sampler_{b}"] = part("sampler", model=base, batch=b, seq_len=16 if a.quick else 1600,
                                         dtype="bfloat16")
            save()
    r.update(part("block", model=base, batch=batch, seq_len=length, dtype="bfloat16"))
    r.update(part("scan", batch=batch, seq_len=length, device=True))  # the scan alone: chunks, plain, sequential, fused
    r["device"] = device_info()
    peak = (r["matmul"] or {}).get("matmul_peak_gflops")
    bandwidth = (r["matmul"] or {}).get("bandwidth_gb_per_s")
    for group in DEVICE_GROUPS:
        for run in r.get(group, {}).values():
            if "ms_per_step" in run:
                run["model_tflops_per_s"] = run["model_gflops_per_step"] / run["ms_per_step"]  # GFLOP/ms = TFLOP/s
                run["mfu"] = 1000 * run["model_tflops_per_s"] / peak if peak else None
                run["vs_thesis_pod"] = run["tokens_per_s"] / THESIS_TOKENS_PER_S
                # the step's time if it ran at the measured bandwidth and did nothing else
                run["memory_bound_ms"] = 1000 * run["hbm_gb_per_step"] / bandwidth \
                    if run.get("hbm_gb_per_step") and bandwidth else None
    core = r.get("core", {})
    ratio = lambda a_, b_: core[a_]["ms_per_step"] / core[b_]["ms_per_step"] \
        if "ms_per_step" in core.get(a_, {}) and "ms_per_step" in core.get(b_, {}) else None
    r["pooling_speedup_bf16"], r["pooling_speedup_f32"] = ratio("no_pooling_bf16", "bf16"), ratio("no_pooling_f32", "f32")
    r["bf16_speedup"] = ratio("f32", "bf16")
    for name, run in r.get("tuning", {}).items():  # against core's bf16 (an accelerator has no noisy neighbour)
        if "ms_per_step" in run and "ms_per_step" in core.get("bf16", {}):
            run["speedup_over_bf16"] = core["bf16"]["ms_per_step"] / run["ms_per_step"]
    runs = list(r.get("memory", {}).values())  # against its first variant, timed in the same process
    for run in runs:
        if "ms_per_step" in run and "ms_per_step" in runs[0]:
            run["speedup_over_first"] = runs[0]["ms_per_step"] / run["ms_per_step"]
    r["seconds"] = time.perf_counter() - start
    save()
    print_device_table(r)
    return 0


def device_info():
    """The device's name, count and the jax version, from a fresh process (this one never imports jax)."""
    code = "import jax, json; d = jax.devices(); print(json.dumps({'kind': d[0].device_kind, 'platform': " \
           "d[0].platform, 'count': len(d), 'jax': jax.__version__}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}


def print_device_table(r):
    f = lambda v, spec: "-" if v is None else format(v, spec)
    print(f"\n{r['device'].get('kind')} | batch {r['batch']} x {r['seq_len']} | bf16 matmul "
          f"{f((r['matmul'] or {}).get('matmul_peak_gflops', 0) / 1000, '.0f')} TFLOP/s, f32 matmul "
          f"{f((r.get('matmul_f32') or {}).get('matmul_peak_gflops', 0) / 1000, '.0f')} TFLOP/s")
    print(f"{'step':18s} {'ms':>9s} {'tokens/s':>11s} {'TFLOP/s':>8s} {'MFU':>6s} {'GiB':>6s} {'compile s':>9s} "
          f"{'loss':>6s} {'HBM GB':>7s} {'bound ms':>8s}")
    for group in DEVICE_GROUPS:
        for name, run in r.get(group, {}).items():
            if "error" in run:
                print(f"{name:18s} {run['error'][:60]}")
                continue
            print(f"{name:18s} {run['ms_per_step']:9.1f} {run['tokens_per_s']:11,.0f} {f(run['model_tflops_per_s'], '8.1f')} "
                  f"{f(run['mfu'] and 100 * run['mfu'], '5.1f')}% {f(run['memory_gib'], '6.1f')} {run['compile_s']:9.1f} "
                  f"{run['loss_bits']:6.3f} {f(run.get('hbm_gb_per_step'), '7.1f')} {f(run.get('memory_bound_ms'), '8.1f')}")
    for b in (16, 256):
        s = r.get(f"sampler_{b}") or {}
        print(f"sampler batch {b}: {f(s.get('sampler_tokens_per_s'), ',.0f')} tokens/s "
              f"(forward {f(s.get('forward_tokens_per_s'), ',.0f')})")
    for k in ("pooling_speedup_bf16", "pooling_speedup_f32", "bf16_speedup", "mlp_block_ms", "temporal_block_ms",
              "scan_chunk_16_ms", "scan_chunk_64_ms", "scan_chunk_256_ms", "scan_plain_assoc_ms", "scan_seq_ms",
              "seconds"):
        print(f"{k:22s} {f(r.get(k), '.3g')}")


if __name__ == "__main__":
    sys.exit(main())
