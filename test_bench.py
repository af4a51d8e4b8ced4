"""bench.py's FLOP count against the matmuls JAX actually traces."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

import bench
import pf


def traced_matmul_flops(jaxpr):
    """2 x multiply-adds of every dot_general in a jaxpr, inner jaxprs included (a scan's body
    counted once per iteration)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in contract]))
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        total += times * sum(traced_matmul_flops(sub) for sub in inner_jaxprs(eqn))
    return total


def inner_jaxprs(eqn):
    """The jaxprs an equation holds in its parameters (scan and cond bodies, remat, custom VJPs)."""
    for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                yield sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub


@pytest.mark.parametrize("changes", [
    {},  # the baseline
    {"pooling": (), "layers": (36,)},  # the no-pooling model of the pooling speedup
    {"pooling": (4, 2), "layers": (1, 2, 3), "d_model": 32, "d_rnn": 64, "groups": 4, "gated": False},
    {"pooling": (2,), "layers": (1, 1), "d_model": 16, "d_rnn": 64, "complex_rnn": False, "placement": "after"},
    {"pooling": (2,), "layers": (1, 1), "d_model": 16, "d_rnn": 64, "deepest": "attention"},  # at the deepest only
])
def test_count_flops_equals_the_traced_matmuls_of_the_forward(changes, monkeypatch):
    """Model FLOPs count the RG-LRU gates' 32 blocks, not the zeros pf.block_diagonal's dense matmul
    also multiplies: traced here with the gates as block matmuls (bench.block_diagonal_einsum)."""
    cfg = pf.Config(**changes)
    seq_len = 2 * cfg.total_pooling
    params = jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))
    monkeypatch.setattr(pf, "block_diagonal", bench.block_diagonal_einsum)
    jaxpr = jax.make_jaxpr(lambda p, x: pf.apply(p, x, cfg))(params, jnp.zeros((1, seq_len), jnp.int32))
    # the attention ablation's q.k scores and their weighting of v, S_d^2 x D multiply-adds each at the
    # deepest level's length S_d, are quadratic in the length: left out of the per-token count
    s_d = seq_len // cfg.total_pooling
    scores = 2 * 2 * s_d**2 * cfg.d_model if cfg.deepest == "attention" else 0
    assert bench.count_flops(cfg) * seq_len + scores == traced_matmul_flops(jaxpr.jaxpr)


def primitives(jaxpr):
    """Names of every primitive in a jaxpr, inner jaxprs included."""
    names = set()
    for eqn in jaxpr.eqns:
        names |= {eqn.primitive.name}.union(*(primitives(sub) for sub in inner_jaxprs(eqn)))
    return names


def test_matmul_only_ceiling_keeps_every_matmul_and_no_elementwise_math(monkeypatch):
    cfg = pf.Config(pooling=(2,), layers=(1, 1), d_model=64, d_rnn=128)
    seq_len, params = 4, jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))

    def trace(cfg):
        fn = lambda p, x, k: pf.apply(p, x, cfg, key=k)
        return jax.make_jaxpr(fn)(params, jnp.zeros((1, seq_len), jnp.int32), jax.random.key(1)).jaxpr

    math_ops = {"exp", "logistic", "tanh", "erf", "rsqrt", "sqrt", "log", "log1p", "random_bits", "threefry2x32"}
    model = trace(cfg)
    assert math_ops & primitives(model)  # the real model has them (so this test can fail)
    stripped = bench.strip_to_matmuls(pf, cfg, monkeypatch.setattr)
    assert stripped.dropout == 0.0
    jaxpr = trace(stripped)
    assert not math_ops & primitives(jaxpr)
    assert traced_matmul_flops(jaxpr) == traced_matmul_flops(model) > bench.count_flops(cfg) * seq_len  # dense gates


def test_block_diagonal_gates_as_one_dense_matmul_equal_the_block_matmuls():
    """pf.block_diagonal (one matmul, zeros off the blocks) against NumPy block by block, values and
    the gradient of the weights; bench's "einsum" variant (the old form) gives the same values."""
    rng = np.random.default_rng(0)
    p = {"w": rng.normal(size=(32, 4, 2)).astype(np.float32), "b": rng.normal(size=64).astype(np.float32)}
    x, g = rng.normal(size=(3, 5, 128)).astype(np.float32), rng.normal(size=(3, 5, 64)).astype(np.float32)
    blocks_x, blocks_g = x.reshape(3, 5, 32, 4), g.reshape(3, 5, 32, 2)
    expected = np.einsum("sbhi,hio->sbho", blocks_x, p["w"]).reshape(3, 5, 64) + p["b"]
    expected_dw = np.einsum("sbhi,sbho->hio", blocks_x, blocks_g)
    p = jax.tree.map(jnp.asarray, p)
    got = pf.block_diagonal(p, jnp.asarray(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bench.block_diagonal_einsum(p, jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)
    dw = jax.grad(lambda w: jnp.sum(pf.block_diagonal({**p, "w": w}, jnp.asarray(x)) * g))(p["w"])
    np.testing.assert_allclose(dw, expected_dw, rtol=1e-4, atol=1e-4)


def test_device_benchmark_runs_at_small_sizes_and_its_figures_agree(tmp_path):
    """`python bench.py --device --quick`: the accelerator benchmark's code path on the CPU, with a tiny
    model. Its figures must hang together: FLOPs from count_flops, MFU from the step time and the
    measured matmul, the same loss in bf16 and float32 (same init, same batch: bf16 rounding only)
    and with another remat policy (recomputing or saving changes no value)."""
    import json
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--device", "--quick", "--groups", "core,tuning",
                           "--out", str(out)],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    cfg = pf.Config(**bench.TINY)
    n_tokens = r["batch"] * r["seq_len"]
    core, peak = r["core"], r["matmul"]["matmul_peak_gflops"]
    assert set(core) == {"bf16", "f32"} and set(r["tuning"]) == {"remat_dots"}  # the default groups (memory: opt-in)
    assert r["matmul"]["bandwidth_gb_per_s"] > 0
    for run in [*core.values(), *r["tuning"].values()]:
        assert run["params"] == pf.count_params(jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg)))
        assert run["model_gflops_per_step"] == pytest.approx(3 * bench.count_flops(cfg) * n_tokens / 1e9)
        assert run["tokens_per_s"] == pytest.approx(n_tokens / (run["ms_per_step"] / 1000))
        assert run["mfu"] == pytest.approx(run["model_gflops_per_step"] / (run["ms_per_step"] / 1000) / peak)
        assert run["memory_gib"] > 0 and 7.0 < run["loss_bits"] < 10.0  # ~8 bits: random tokens, fresh model
        assert run["hbm_gb_per_step"] > 0 and run["memory_bound_ms"] > 0
        assert run["timed_steps"] == 2  # the median of --repeats (2) timed steps, each variant alike
    # the same loss to bf16's rounding, and not the same number: the bf16 variant computes in bf16
    assert 0 < abs(core["bf16"]["loss_bits"] - core["f32"]["loss_bits"]) < 0.02
    # recomputing or saving changes no value
    tuning = r["tuning"]
    assert abs(tuning["remat_dots"]["loss_bits"] - core["bf16"]["loss_bits"]) < 1e-3
    assert tuning["remat_dots"]["speedup_over_bf16"] == pytest.approx(
        core["bf16"]["ms_per_step"] / tuning["remat_dots"]["ms_per_step"])
    assert all(r[f"scan_{k}_ms"] > 0 for k in ("chunk_16", "chunk_64", "chunk_256", "plain_assoc", "seq", "fused"))
    # the scan's memory bound: 8 arrays of S x B x 128 complex64 (forward and backward) at the copy bandwidth
    assert r["scan_bytes_per_call"] == 8 * r["seq_len"] * r["batch"] * 128 * 8
    assert r["scan_memory_bound_ms"] == pytest.approx(1000 * r["scan_bytes_per_call"] / (r["scan_copy_gb_per_s"] * 1e9))
    assert r["bf16_speedup"] == pytest.approx(core["f32"]["ms_per_step"] / core["bf16"]["ms_per_step"])
    assert r["sampler_16"]["sample_batch"] == 16 and r["sampler_16"]["sampler_tokens_per_s"] > 0
    assert "sampler_256" not in r  # --quick samples one batch size (an accelerator run: 16 and 256)
    assert r["device"]["platform"] == "cpu" and "step" in proc.stdout


def test_the_cpu_benchmarks_summary_is_computed_from_its_parts(tmp_path, monkeypatch):
    """`python bench.py --quick`, every part stubbed with round numbers: the summary's MFU is the baseline
    step's model GFLOP/s over the measured matmul peak (GFLOP per step over seconds per step), the
    matmul-only ceiling's likewise, and the speedups are the other variant's step time over the baseline's."""
    # each variant side by side: ms per step, GFLOP per step, tokens/s
    steps = {"baseline": (50.0, 2.0, 1000.0), "no_pooling": (200.0, 6.0, 250.0), "fixes_off": (75.0, 2.0, 667.0),
             "matmul_only": (20.0, 1.5, 2500.0)}

    def run_part(name, timeout=None, **kw):
        if name == "train" and "variants" in kw:
            return [{"ms_per_step": ms, "model_gflops_per_step": gflop, "tokens_per_s": tokens, "peak_mem_gib": 9.9,
                     "compile_s": 99.0} for ms, gflop, tokens in (steps[v] for v in bench.VARIANTS)]
        if name == "train":  # the baseline alone: its memory and compile time
            return [{"ms_per_step": 55.0, "model_gflops_per_step": 2.0, "tokens_per_s": 900.0, "peak_mem_gib": 1.5,
                     "compile_s": 9.0}]
        return {"matmul": {"matmul_peak_gflops": 400.0}, "scan": {"scan_assoc_over_seq": 0.5},
                "block": {"mlp_block_gflops_per_s": 100.0, "temporal_block_gflops_per_s": 50.0}}.get(name, {})
    monkeypatch.setattr(bench, "run_part", run_part)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["model_gflops_per_s"] == pytest.approx(2.0 / 0.050)  # 40 GFLOP/s
    assert r["mfu"] == pytest.approx(40.0 / 400.0) and r["matmul_only_mfu"] == pytest.approx(1.5 / 0.020 / 400.0)
    assert (r["mlp_block_mfu"], r["temporal_block_mfu"]) == (pytest.approx(0.25), pytest.approx(0.125))
    assert r["scan_assoc_over_seq"] == 0.5
    assert r["pooling_speedup"] == pytest.approx(4.0) and r["pooling_flop_ratio"] == pytest.approx(3.0)
    assert r["speedup_over_fixes_off"] == pytest.approx(1.5)
    assert (r["train_tokens_per_s"], r["peak_mem_gib"], r["compile_s"]) == (1000.0, 1.5, 9.0)


def test_the_scans_memory_bound_is_four_copies_of_its_arrays(monkeypatch):
    """--part scan's bound, with every timing stubbed at 2 ms: a copy of one S x B x 128 complex64 array
    reads it and writes it (2 arrays' bytes in 2 ms); the scan, forward and backward, moves 8 such arrays,
    so its memory-bound time is 4 copies: 8 ms."""
    timed_args = []

    def two_ms(fn, *args, repeats=3, options=None):
        timed_args.append(args)
        return 0.0, 0.002

    monkeypatch.setattr(bench, "timed", two_ms)
    r = bench.part_scan(bench.parse_args(["--part", "scan", "--batch", "3", "--seq-len", "40"]))
    (copied,) = timed_args[-1]  # the copy is timed last
    assert copied.shape == (40, 3, 128) and copied.dtype == jnp.complex64
    array_bytes = 40 * 3 * 128 * 8
    assert r["scan_copy_gb_per_s"] == pytest.approx(2 * array_bytes / 0.002 / 1e9)
    assert r["scan_bytes_per_call"] == 8 * array_bytes and r["scan_memory_bound_ms"] == pytest.approx(8.0)
    assert r["scan_assoc_ms"] == r["scan_seq_ms"] == pytest.approx(2.0)


def test_timed_is_the_median_call_and_the_matmul_peak_counts_two_flops_per_multiply_add(monkeypatch):
    """bench.timed on a scripted clock: the compile's seconds, then the median of the timed calls (not
    their sum or the warm-up call). part_matmul with its timings stubbed: an n x n matmul is 2 n^3 FLOPs,
    the copy reads and writes its array once. executable_gib: arguments + outputs + temporaries, the
    donated (aliased) bytes counted once."""
    # perf_counter at: compile start, compile end, then each timed call's start and end (the warm-up is untimed)
    clock = iter([10.0, 12.5, 20.0, 20.3, 21.0, 21.1, 22.0, 22.9])
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))  # bench's clock only
    assert bench.timed(lambda x: x + 1, jnp.ones(3)) == pytest.approx((2.5, 0.3))  # calls of 0.3, 0.1, 0.9 s
    monkeypatch.undo()

    seconds = iter([0.5, 0.25])  # the matmul's median, then the copy's

    def stub(fn, *args, repeats=3, options=None):
        return 0.0, next(seconds)

    monkeypatch.setattr(bench, "timed", stub)
    r = bench.part_matmul(bench.parse_args(["--part", "matmul", "--n", "64"]))
    assert r["matmul_peak_gflops"] == pytest.approx(2 * 64**3 / 0.5 / 1e9)
    assert r["bandwidth_gb_per_s"] == pytest.approx(2 * 64 * 256 * 4 / 0.25 / 1e9)  # a float32 (n, 4n) array

    memory = types.SimpleNamespace(argument_size_in_bytes=2**30, output_size_in_bytes=2**29,
                                   alias_size_in_bytes=2**28, temp_size_in_bytes=2**31)
    compiled = types.SimpleNamespace(memory_analysis=lambda: memory)
    assert bench.executable_gib(compiled) == pytest.approx(1 + 0.5 - 0.25 + 2)


def test_hlo_sources_trace_a_compiled_instruction_to_its_scope_and_line():
    def body(x):
        with jax.named_scope("level7"):
            return jnp.sin(x) * 3.0  # the line hlo_sources must name

    line = body.__code__.co_firstlineno + 2
    text = jax.jit(body).lower(jnp.ones(4)).compile().as_text()
    found = {(op, where) for op, where in bench.hlo_sources(text).values() if op.endswith("/sin") or "/mul" in op}
    assert found and all(where == f"test_hlo_sources_trace_a_compiled_instruction_to_its_scope_and_line."
                         f"<locals>.body:{line}" and "/level7/" in op for op, where in found), found


def test_profile_of_a_training_step_splits_its_time_by_level_block_and_pass():
    """bench.py --profile on the CPU: one step of a two-level model, its kernels' time summed by the
    model's named scopes. Every split sums to the whole; both levels, both blocks and the backward
    pass show up, and the scan is among the temporal block's lines."""
    import train
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    cfg = pf.Config(pooling=(2,), layers=(1, 1), d_model=16, d_rnn=64, dropout=0.0)
    tc = train.TrainConfig(batch_size=2)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state = jax.device_put(jax.jit(lambda: train.init_state(cfg, tc))(), NamedSharding(mesh, P()))
    tokens = np.random.default_rng(0).integers(0, 256, (2, 64), dtype=np.uint8)
    args = (state, tokens, np.ones_like(tokens, bool), np.float32(1))
    step = train.make_train_step(cfg, tc, mesh).lower(*args).compile()
    prof = bench.profile_step(step, args, step.as_text(), top=1000)
    assert prof["kernels"] > 0 and prof["busy_ms"] > 0 and prof["attributed"] > 0.5
    for split in ("by_level", "by_block", "by_pass", "by_source"):
        assert sum(prof[split].values()) == pytest.approx(prof["busy_ms"], rel=1e-3, abs=0.01), split
    assert {"level0", "level1"} <= set(prof["by_level"]) and {"temporal", "mlp"} <= set(prof["by_block"])
    assert all(prof["by_pass"].get(p, 0) > 0 for p in ("fwd", "recompute", "bwd")), prof["by_pass"]  # remat on
    assert any(k.startswith("scan_associative:") for k in prof["by_source"]), list(prof["by_source"])[:10]


def test_kernel_times_count_a_loop_body_not_the_loop_around_it(tmp_path):
    """On a CPU a while loop is an event spanning its body's: counting both would count the body twice."""
    import glob
    from jax.profiler import ProfileData
    f = jax.jit(lambda x: jax.lax.fori_loop(0, 20, lambda i, x: jnp.sin(x) * 1.01, x))
    x = jnp.ones(200_000)
    jax.block_until_ready(f(x))
    with jax.profiler.trace(str(tmp_path)):
        jax.block_until_ready(f(x))
    kernels = bench.kernel_times(ProfileData.from_file(glob.glob(f"{tmp_path}/**/*.xplane.pb", recursive=True)[0]))
    names = [name for name, _ in kernels]
    assert not [n for n in names if n.startswith("while")], names
    assert sum(1 for n in names if "sin" in n or "multiply" in n or "fusion" in n) >= 20, names


def test_kernel_times_keep_back_to_back_kernels_at_a_long_traces_timestamps():
    """A GPU stream's kernels 0 ns apart, a second into a trace (timestamps near 1e9 ns, which a float32
    rounds to 64 ns): each ends before the next begins, so both count, each with its own duration."""
    event = lambda start, ns, name: types.SimpleNamespace(start_ns=start, duration_ns=ns, name=name, stats=[])
    stream = types.SimpleNamespace(name="Stream #7", events=[event(10**9 + 90, 30, "fusion.2"),
                                                              event(10**9 + 40, 50, "fusion.1")])
    profile = types.SimpleNamespace(planes=[types.SimpleNamespace(name="/device:GPU:0", lines=[stream])])
    assert bench.kernel_times(profile) == [("fusion.1", 50.0), ("fusion.2", 30.0)]


def test_kernel_times_keep_a_body_kernel_that_starts_with_its_loop():
    """A CPU's while loop and the first kernel of its body can begin at the same nanosecond: the loop,
    the longer event, holds the body, so the body's kernels count and the loop does not."""
    event = lambda start, ns, op: types.SimpleNamespace(start_ns=start, duration_ns=ns, name=op,
                                                        stats=[("hlo_op", op)])
    thread = types.SimpleNamespace(name="tf_XLACpuThread", events=[event(100, 40, "fusion.1"), event(100, 100, "while.3"),
                                                                    event(140, 50, "dot.2")])
    profile = types.SimpleNamespace(planes=[types.SimpleNamespace(name="/host:CPU", lines=[thread])])
    assert bench.kernel_times(profile) == [("fusion.1", 40.0), ("dot.2", 50.0)]

@pytest.mark.parametrize("argv, message", [
    (["--part", "train", "--variants", '[{"gates": "dense"}]'], 'gates="dense" is not known'),
    (["--part", "train", "--variants", '[{"remat": "all"}]'], 'remat="all" is not known'),
    (["--part", "scan", "--profile"], "--profile works with --part train"),
    (["--part", "train", "--profile-dir", "x"], "--profile-dir with --profile"),
])
def test_bench_refuses_unknown_variants_and_profiles_of_other_parts(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert message in str(e.value)


def test_a_variants_patches_are_all_undone_even_one_patched_twice():
    """bench.patches: what a variant sets inside the block (a switch set twice, as {"before": true,
    "chunk": 16} sets pf.SCAN_CHUNK to 1 then 16) is back to its value from before the block afterwards,
    also when the block raises, so no variant's switch leaks into the next variant."""
    switches = types.SimpleNamespace(SCAN_CHUNK=None, SCAN="associative")
    with bench.patches() as set_attr:
        set_attr(switches, "SCAN_CHUNK", 1)
        set_attr(switches, "SCAN_CHUNK", 16)
        set_attr(switches, "SCAN", "fused")
        assert (switches.SCAN_CHUNK, switches.SCAN) == (16, "fused")
    assert (switches.SCAN_CHUNK, switches.SCAN) == (None, "associative")
    with pytest.raises(ZeroDivisionError), bench.patches() as set_attr:
        set_attr(switches, "SCAN_CHUNK", 1)
        set_attr(switches, "SCAN_CHUNK", 64)
        1 / 0
    assert switches.SCAN_CHUNK is None


def test_a_microbatched_train_step_counts_the_tokens_of_the_whole_batch():
    """--microbatch splits the step's batch, not its work: tokens/s and the model FLOPs of a step count all
    batch x seq_len tokens (2 x 32 here, in microbatches of 1)."""
    a = bench.parse_args(["--part", "train", "--batch", "2", "--seq-len", "32", "--microbatch", "1", "--repeats", "1",
                          "--variants", json.dumps([{"model": bench.TINY}])])
    run, = bench.part_train(a)
    assert run["timed_steps"] == 1 and 7.0 < run["loss_bits"] < 10.0
    assert run["tokens_per_s"] == pytest.approx(2 * 32 / (run["ms_per_step"] / 1000))
    assert run["model_gflops_per_step"] == pytest.approx(3 * bench.count_flops(pf.Config(**bench.TINY)) * 2 * 32 / 1e9)
