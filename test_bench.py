"""bench.py's FLOP count against the matmuls JAX actually traces."""
import os

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
])
def test_count_flops_equals_the_traced_matmuls_of_the_forward(changes):
    cfg = pf.Config(**changes)
    seq_len = 2 * cfg.total_pooling
    params = jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))
    jaxpr = jax.make_jaxpr(lambda p, x: pf.apply(p, x, cfg))(params, jnp.zeros((1, seq_len), jnp.int32))
    assert bench.count_flops(cfg) * seq_len == traced_matmul_flops(jaxpr.jaxpr)


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
    assert math_ops & primitives(trace(cfg))  # the real model has them (so this test can fail)
    stripped = bench.strip_to_matmuls(pf, cfg, monkeypatch.setattr)
    assert stripped.dropout == 0.0
    jaxpr = trace(stripped)
    assert not math_ops & primitives(jaxpr)
    assert traced_matmul_flops(jaxpr) == bench.count_flops(cfg) * seq_len


def test_device_benchmark_runs_at_small_sizes_and_its_figures_agree(tmp_path):
    """`python bench.py --device --quick`: the accelerator benchmark's code path on the CPU, with a tiny
    model. Its figures must hang together: FLOPs from count_flops, MFU from the step time and the
    measured matmul, the same loss in bf16 and float32 (same init, same batch: bf16 rounding only)
    and with another remat policy (recomputing or saving changes no value)."""
    import json
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--device", "--quick", "--groups", "core,tuning,memory",
                           "--out", str(out)],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    cfg = pf.Config(**bench.TINY)
    n_tokens = r["batch"] * r["seq_len"]
    core, peak = r["core"], r["matmul"]["matmul_peak_gflops"]
    assert set(core) == {"bf16", "f32"} and set(r["tuning"]) == {"remat_dots"}
    assert set(r["memory"]) == {"micro8", "micro8_no_remat"}
    assert r["matmul"]["bandwidth_gb_per_s"] > 0
    for run in [*core.values(), *r["tuning"].values(), *r["memory"].values()]:
        assert run["params"] == pf.count_params(jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg)))
        assert run["model_gflops_per_step"] == pytest.approx(3 * bench.count_flops(cfg) * n_tokens / 1e9)
        assert run["tokens_per_s"] == pytest.approx(n_tokens / (run["ms_per_step"] / 1000))
        assert run["mfu"] == pytest.approx(run["model_gflops_per_step"] / (run["ms_per_step"] / 1000) / peak)
        assert run["memory_gib"] > 0 and 7.0 < run["loss_bits"] < 10.0  # ~8 bits: random tokens, fresh model
        assert run["hbm_gb_per_step"] > 0 and run["memory_bound_ms"] > 0
    assert abs(core["bf16"]["loss_bits"] - core["f32"]["loss_bits"]) < 0.02
    # recomputing or saving changes no value
    tuning, memory = r["tuning"], r["memory"]
    assert abs(tuning["remat_dots"]["loss_bits"] - core["bf16"]["loss_bits"]) < 1e-3
    assert abs(memory["micro8_no_remat"]["loss_bits"] - memory["micro8"]["loss_bits"]) < 1e-3  # pf.REMAT off
    # (microbatches draw their own dropout masks: the same loss up to dropout's noise, ~0.05 here)
    assert abs(memory["micro8"]["loss_bits"] - core["bf16"]["loss_bits"]) < 0.15
    assert tuning["remat_dots"]["speedup_over_bf16"] == pytest.approx(
        core["bf16"]["ms_per_step"] / tuning["remat_dots"]["ms_per_step"])
    assert all(r[f"scan_{k}_ms"] > 0 for k in ("chunk_16", "chunk_64", "chunk_256", "plain_assoc", "seq"))
    assert r["bf16_speedup"] == pytest.approx(core["f32"]["ms_per_step"] / core["bf16"]["ms_per_step"])
    for b in (16, 256):
        assert r[f"sampler_{b}"]["sample_batch"] == b and r[f"sampler_{b}"]["sampler_tokens_per_s"] > 0
    assert r["device"]["platform"] == "cpu" and "step" in proc.stdout
