"""Properties of pf.py, each against an independent reference: the thesis' tables, NumPy loops,
the sequential scan, the token-by-token step."""
import argparse
import dataclasses
import functools
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from jax.extend.core import ClosedJaxpr, Jaxpr

import pf

SMALL = dict(d_model=16, d_rnn=64, dropout=0.0)
apply = jax.jit(pf.apply, static_argnames="cfg")  # one compile per config, not op-by-op dispatch
# op by op: its primitives (one per leaf shape) compile once per process and every later config reuses
# them (~0.3 s); jitted, each config's init is one program of ~5-9 s to compile (its random draws)
init = pf.init


def assert_close(actual, expected, tol, what=""):
    diff = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected)), initial=0.0))
    assert diff <= tol, f"{what}: largest difference {diff:.3g} > {tol:.3g}"


# ---------------------------------------------------------------- 1. parameter counts == thesis


THESIS_COUNTS = [  # (table, row, config changes, parameters)
    ("4.1", "baseline", {}, 7_272_704),
    ("4.1", "RMSNorm", {"norm": "rms"}, 7_263_488),
    ("4.1", "scale = 0", {"scale": 0.0}, 7_272_704),
    ("4.1", "scale = 1", {"scale": 1.0}, 7_272_704),
    ("4.1", "w/o gating", {"gated": False}, 5_489_408),
    ("4.1", "long skips", {"skip": "long"}, 7_272_704),
    ("4.1", "all ResBlocks after pooling", {"placement": "after"}, 7_272_704),
    ("4.1", "w/o complex numbers", {"complex_rnn": False}, 7_355_648),
    ("4.1", "half ring", {"ring": "half"}, 7_272_704),
    ("4.1", "full ring", {"ring": "full"}, 7_272_704),
    ("4.1", "full circle", {"ring": "circle"}, 7_272_704),
    ("4.1", "attention", {"deepest": "attention"}, 7_229_184),  # the 4 deepest layers' temporal mixing
    ("4.2", "1 pooling layer", {"pooling": (2,), "layers": (12, 12)}, 7_268_608),
    ("4.2", "no pooling", {"pooling": (), "layers": (36,)}, 7_267_840),
    ("4.3", "G = 1", {"groups": 1}, 7_760_384),
    ("4.3", "G = 2", {"groups": 2}, 7_514_624),
    ("4.3", "G = 4", {"groups": 4}, 7_391_744),
    ("4.3", "G = 8", {"groups": 8}, 7_330_304),
    ("4.4", "D 128 R 256", {"pooling": (2, 4), "layers": (4, 4, 4)}, 4_054_528),
    ("4.4", "D 256 R 256", {"pooling": (2, 4), "layers": (4, 4, 4), "d_model": 256}, 13_295_360),
    ("4.4", "D 384 R 256", {"pooling": (2, 4), "layers": (4, 4, 4), "d_model": 384}, 27_779_072),
    ("4.4", "D 128 R 512", {"pooling": (2, 4), "layers": (4, 4, 4), "d_rnn": 512}, 5_503_488),
    ("4.4", "D 128 R 1024", {"pooling": (2, 4), "layers": (4, 4, 4), "d_rnn": 1024}, 8_647_168),
]


def test_the_start_token_is_the_token_of_silence_the_data_encodes_and_pads_with():
    """pf.SILENCE (the input at position 0, the sampler's first input) is what data.py gives x = 0 under
    both 8-bit encodings, and the token it pads rows with: the model starts from the silence it trained on."""
    import data
    for encoding in (data.mu_law_encode, data.linear_encode):
        assert encoding(np.zeros(3)).tolist() == [pf.SILENCE] * 3
    assert data.SILENCE == pf.SILENCE
    assert data.encode(np.zeros((1, 5)), "mu-law").tolist() == [[pf.SILENCE] * 5]  # a silent clip, min-max scaled


@pytest.mark.parametrize("table,row,changes,expected", THESIS_COUNTS, ids=[f"{t}:{r}" for t, r, _, _ in THESIS_COUNTS])
def test_parameter_count_equals_thesis_table(table, row, changes, expected):
    cfg = pf.Config(**changes)
    shapes = jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))
    assert pf.count_params(shapes) == expected, f"table {table}, {row}"


def test_cli_prints_the_tree_and_ends_with_the_count():
    """`python pf.py`: the config, then the tree, two spaces deeper per level: each array with its shape
    and size, each component with its count, the sum of the lines one level below it; the total last."""
    out = subprocess.run([sys.executable, "pf.py", "--no-gated", "--groups", "1"], capture_output=True,
                         text=True, check=True).stdout
    lines = out.strip().splitlines()
    # without gating 5,489,408; G = 1 adds 487,680 (= 7,760,384 - 7,272,704)
    assert lines[-1] == f"params: {5_489_408 + 487_680}"
    assert any(line.strip().startswith("rglru:") for line in lines)
    tree = []  # (depth, count, shape or None) of each line between the config and the total
    for line in lines[1:-1]:
        m = re.fullmatch(r"( *)\w+(?: \(([\d, ]*)\))?: ([\d,]+)", line)
        assert m and len(m[1]) % 2 == 0, line
        tree.append((len(m[1]) // 2, int(m[3].replace(",", "")), m[2]))
    assert tree[0][0] == 0 and all(b[0] <= a[0] + 1 for a, b in zip(tree, tree[1:]))
    assert sum(count for depth, count, _ in tree if depth == 0) == int(lines[-1].split()[-1])
    for i, (depth, count, shape) in enumerate(tree):
        if shape is not None:  # an array: its size
            assert tree[i + 1:i + 2] == [] or tree[i + 1][0] <= depth
            assert count == math.prod(int(n) for n in shape.replace(",", " ").split())
            continue
        end = next((j for j in range(i + 1, len(tree)) if tree[j][0] <= depth), len(tree))  # its subtree's end
        children = sum(c for d, c, _ in tree[i + 1:end] if d == depth + 1)
        assert count == children and children > 0, tree[i]


def test_config_flags_default_to_the_preset_they_are_given():
    """add_config_args(parser, defaults): with no flags, every field (tuple, bool, choice, float, int) takes
    the preset's value, not the baseline's, and --help shows it; a flag still overrides it."""
    preset = pf.Config(pooling=(4, 4), layers=(1, 2, 3), d_model=32, complex_rnn=False, ring="half",
                       norm="rms", scale=0.5, dropout=0.1, vocab=64)
    parser = argparse.ArgumentParser()
    pf.add_config_args(parser, preset)
    assert pf.config_from_args(parser.parse_args([])) == preset
    assert pf.config_from_args(parser.parse_args(["--d-model", "64"])) == dataclasses.replace(preset, d_model=64)
    text = " ".join(parser.format_help().split())
    assert "(default: 4 4)" in text and "(default: 32)" in text and "(default: half)" in text


# ---------------------------------------------------------------- 2. associative scan == sequential scan


def random_recurrence(seed, length, complex_rnn, near_one):
    rng = np.random.default_rng(seed)
    n = 3
    mag = 1.0 - rng.uniform(0, 1e-3 if near_one else 0.5, (length, 2, n))  # |a| up to 0.999..
    if complex_rnn:
        a = mag * np.exp(1j * rng.uniform(-np.pi, np.pi, mag.shape))
        b = rng.normal(size=mag.shape) + 1j * rng.normal(size=mag.shape)
        return jnp.asarray(a, jnp.complex64), jnp.asarray(b, jnp.complex64), jnp.asarray(b[0] * 0.3, jnp.complex64)
    return jnp.asarray(mag, jnp.float32), jnp.asarray(rng.normal(size=mag.shape), jnp.float32), jnp.float32(0.3)


def scan_value_and_grad(scan):
    """h and the gradients of a real loss touching every output, in one compiled function."""
    def loss(a, b, h0):
        h = scan(a, b, h0)
        return jnp.sum(jnp.abs(h) ** 2), h
    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))


@settings(max_examples=16, deadline=None)
@given(length=st.one_of(st.integers(1, 40), st.sampled_from([127, 509, 1021, 2048, 3001])),
       complex_rnn=st.booleans(), near_one=st.booleans(), with_h0=st.booleans(), seed=st.integers(0, 2**16),
       chunk=st.sampled_from([None, 1, 2, 7, 64, 4096]))
def test_associative_scan_equals_sequential_scan(length, complex_rnn, near_one, with_h0, seed, chunk):
    """Any chunk size (1: the plain associative scan; >= length: one chunk) and lengths that chunks
    do not divide."""
    a, b, h0 = random_recurrence(seed, length, complex_rnn, near_one)
    h0 = h0 if with_h0 else jnp.zeros_like(h0)
    (_, fast), (ga, gb) = scan_value_and_grad(functools.partial(pf.scan_associative, chunk=chunk))(a, b, h0)
    (_, slow), (sa, sb) = scan_value_and_grad(pf.scan_sequential)(a, b, h0)
    tol = math.log2(length + 1) * max(float(jnp.max(jnp.abs(slow))), 1.0)
    assert_close(fast, slow, 2e-5 * tol, "values")
    gtol = math.log2(length + 1) * max(float(jnp.max(jnp.abs(sa))), 1.0)
    assert_close(ga, sa, 1e-4 * gtol, "grad a")
    assert_close(gb, sb, 1e-4 * gtol, "grad b")


@settings(max_examples=5, deadline=None)
@example(length=65, batch=1, complex_rnn=True, near="one", with_h0=True, seed=1)  # two chunks, the 2nd one step
@example(length=1021, batch=3, complex_rnn=False, near="mid", with_h0=True, seed=2)  # 16 chunks, padded
@given(length=st.one_of(st.integers(1, 40), st.sampled_from([63, 65, 1021])), batch=st.sampled_from([1, 3]),
       complex_rnn=st.booleans(), near=st.sampled_from(["one", "zero", "mid"]), with_h0=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fused_kernel_equals_sequential_scan_in_values_and_gradients(length, batch, complex_rnn, near, with_h0, seed):
    """pf.scan_fused (the Pallas kernel, interpreted on a CPU): lengths its 64-step chunks do not divide,
    batch 1, real and complex, |a| near 1 and near 0, with and without a start state; values and the
    gradients of a, b and h0 (its own backward kernel) against the sequential scan's."""
    rng = np.random.default_rng(seed)
    shape = (length, batch, 24)  # 24 channels: not a multiple of the kernel's 32 lanes either
    mag = {"one": 1 - rng.uniform(0, 1e-3, shape), "zero": rng.uniform(0, 1e-2, shape), "mid": rng.uniform(0.3, 1, shape)}[near]
    a = mag * np.exp(1j * rng.uniform(-np.pi, np.pi, shape)) if complex_rnn else mag
    b = rng.normal(size=shape) + (1j * rng.normal(size=shape) if complex_rnn else 0)
    h0 = b[0] * 0.7 if with_h0 else np.zeros_like(b[0])
    dtype = jnp.complex64 if complex_rnn else jnp.float32
    a, b, h0 = (jnp.asarray(v, dtype) for v in (a, b, h0))
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)  # a loss that weighs every output differently

    def grads(scan):
        loss = lambda a, b, h0: jnp.sum(w * jnp.abs(scan(a, b, h0)) ** 2)
        return jax.jit(lambda a, b, h0: (scan(a, b, h0), jax.grad(loss, (0, 1, 2))(a, b, h0)))(a, b, h0)
    fused, (ga, gb, gh) = grads(pf.scan_fused)
    ref, (ra, rb, rh) = grads(pf.scan_sequential)
    scale = max(float(jnp.max(jnp.abs(ref))), 1.0)
    assert_close(fused, ref, 1e-5 * scale, "values")
    gscale = max(float(jnp.max(jnp.abs(ra))), float(jnp.max(jnp.abs(rb))), 1.0)
    for got, want, what in ((ga, ra, "grad a"), (gb, rb, "grad b"), (gh, rh, "grad h0")):
        assert_close(got, want, 2e-5 * gscale, what)


def test_fused_kernel_runs_a_whole_clip_and_lowers_to_triton_for_a_gpu():
    """16,000 steps (the baseline's full rate) in values and gradients; and the CUDA lowering of the
    training-step form holds Triton kernels, two per pass (a CPU can check that much of the GPU path)."""
    a, b, _ = random_recurrence(3, 16000, True, True)
    h0 = jnp.zeros_like(b[0])
    (_, fused), (ga, gb) = scan_value_and_grad(pf.scan_fused)(a, b, h0)
    (_, ref), (ra, rb) = scan_value_and_grad(pf.scan_sequential)(a, b, h0)
    assert_close(fused, ref, 1e-4 * float(jnp.max(jnp.abs(ref))), "values")
    gscale = float(jnp.max(jnp.abs(ra)))
    assert_close(ga, ra, 1e-4 * gscale, "grad a")
    assert_close(gb, rb, 1e-4 * gscale, "grad b")
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    f = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(jnp.abs(pf.scan_fused(a, b, jnp.zeros_like(b[0]))) ** 2), (0, 1)))
    exported = jax.export.export(f, platforms=["cuda"], disabled_checks=[triton])(a[:256], b[:256])
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 4  # forward 2 passes, backward 2


def test_the_training_scan_is_the_one_pf_scan_names(monkeypatch):
    a, b, _ = random_recurrence(4, 100, True, False)
    monkeypatch.setattr(pf, "scan_fused", lambda a, b, h0: ("fused", float(jnp.abs(h0).max())))
    monkeypatch.setattr(pf, "scan_associative", lambda a, b: "associative")
    for name, want in (("associative", "associative"), ("fused", ("fused", 0.0))):  # fused: from h = 0
        monkeypatch.setattr(pf, "SCAN", name)
        assert pf.scan(a, b) == want
    monkeypatch.setattr(pf, "SCAN", "fusd")
    with pytest.raises(ValueError, match="'fusd' is not one of associative, fused"):
        pf.scan(a, b)


def test_scan_chunk_default_follows_the_backend(monkeypatch):
    """64-step blocks on a CPU, the plain associative scan on a GPU or TPU (bench.py measured each on
    its own kind of machine), pf.SCAN_CHUNK over both."""
    for backend, chunk in (("cpu", 64), ("gpu", 1), ("tpu", 1)):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert pf.scan_chunk() == chunk
    monkeypatch.setattr(pf, "SCAN_CHUNK", 16)
    assert pf.scan_chunk() == 16


def test_sequential_scan_equals_numpy_loop():
    a, b, h0 = random_recurrence(0, 50, True, False)
    h, expected = np.asarray(h0), []
    for t in range(50):
        h = np.asarray(a[t]) * h + np.asarray(b[t])
        expected.append(h)
    assert_close(pf.scan_sequential(a, b, h0), np.stack(expected), 1e-4, "sequential scan")


def test_sqrt_bounded_has_the_true_derivative_except_near_zero():
    g = jax.vmap(jax.grad(pf.sqrt_bounded))(jnp.array([1e-12, 1e-6, 0.01, 0.25, 1.0]))
    np.testing.assert_allclose(g[2:], 0.5 / np.sqrt([0.01, 0.25, 1.0]), rtol=1e-6)
    np.testing.assert_allclose(g[:2], [pf.SQRT_MAX_GRAD, pf.SQRT_MAX_GRAD], rtol=1e-5)
    assert float(pf.sqrt_bounded(0.25)) == 0.5


# ---------------------------------------------------------------- layers against NumPy references


def test_rglru_equals_numpy_loop_of_thesis_equations():
    """Eq. 3.8-3.11 written out with NumPy loops: gates per block, a = sigma(L)^(c r) e^(i r theta)."""
    for complex_rnn in (True, False):
        cfg = pf.Config(d_rnn=64, complex_rnn=complex_rnn, ring="circle")
        p = jax.tree.map(np.asarray, pf.rglru_init(jax.random.key(3), cfg))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(7, 2, 64)).astype(np.float32)
        n = 32 if complex_rnn else 64
        for gate in ("gate_a", "gate_x"):  # init gives zero biases, which would hide a dropped bias
            p[gate]["b"] = rng.normal(size=n).astype(np.float32)

        def gate(q, xt):  # block b maps inputs [b*64/32, ...) to outputs [b*n/32, ...)
            out = np.zeros((2, n))
            bi, bo = 64 // 32, n // 32
            for blk in range(32):
                out[:, blk * bo:(blk + 1) * bo] = xt[:, blk * bi:(blk + 1) * bi] @ q["w"][blk]
            return 1 / (1 + np.exp(-(out + q["b"])))

        h = np.zeros((2, n), complex)
        outs = []
        for t in range(7):
            r, i = gate(p["gate_a"], x[t]), gate(p["gate_x"], x[t])
            mag = (1 / (1 + np.exp(-p["lambda_"]))) ** (pf.C * r)
            a = mag * np.exp(1j * r * p["theta"]) if complex_rnn else mag
            xt = x[t, :, :32] + 1j * x[t, :, 32:] if complex_rnn else x[t]
            h = a * h + np.sqrt(1 - np.abs(a) ** 2) * (i * xt)
            outs.append(np.concatenate([h.real, h.imag], -1) if complex_rnn else h.real)
        assert_close(pf.rglru(p, jnp.asarray(x), complex_rnn), np.stack(outs), 1e-5, f"complex={complex_rnn}")


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_pooling_equals_numpy_grouped_conv(groups):
    """DownPool: pooled j = sum_i W_i x[jF+i] with block-diagonal W_i (G blocks); UpPool: fine jF+i =
    V_i y_j, then shifted right by F-1."""
    cfg = pf.Config(d_model=8, groups=groups)
    f, d, dg = 3, 8, 8 // groups
    down, up = pf.pool_init(jax.random.key(0), cfg, f), pf.pool_init(jax.random.key(1), cfg, f)
    down["b"] = up["b"] = jnp.arange(d, dtype=jnp.float32) / 10
    x = np.random.default_rng(1).normal(size=(12, 2, d)).astype(np.float32)

    def block_matrix(w):  # (G, D/G, D/G) -> the full (D, D) block-diagonal matrix
        m = np.zeros((d, d))
        for g in range(groups):
            m[g * dg:(g + 1) * dg, g * dg:(g + 1) * dg] = w[g]
        return m

    wd, wu = np.asarray(down["w"]), np.asarray(up["w"])
    pooled = np.stack([sum(x[j * f + i] @ block_matrix(wd[i]) for i in range(f)) for j in range(4)]) + down["b"]
    assert_close(pf.down_pool(down, jnp.asarray(x)), pooled, 1e-5, "down")
    fine = np.stack([pooled[j] @ block_matrix(wu[i]) for j in range(4) for i in range(f)]) + up["b"]
    shifted = np.concatenate([np.zeros((f - 1, 2, d)), fine[: 12 - (f - 1)]])
    assert_close(pf.up_pool(up, jnp.asarray(pooled, jnp.float32)), shifted, 1e-5, "up")


def test_sinusoidal_embedding_is_thesis_eq_4_1_and_4_2():
    cfg = pf.Config(d_model=8)
    q = np.arange(256)
    j = np.arange(4)
    expected = np.concatenate([np.cos(q[:, None] / 10000 ** (j / 4)), np.sin(q[:, None] / 10000 ** (j / 4))], 1)
    assert_close(pf.embedding({}, jnp.asarray(q), cfg), expected, 1e-4, "embedding")


def test_linear_embedding_scales_the_token_by_255_then_a_dense_layer():
    """The ablation of SPEC's embedding: q / 255 in [0, 1], then Dense(1 -> D), written with NumPy."""
    rng = np.random.default_rng(0)
    p = {"dense": {"w": rng.normal(size=(1, 8)).astype(np.float32), "b": rng.normal(size=8).astype(np.float32)}}
    q = np.arange(256)
    expected = (q[:, None] / 255.0) * p["dense"]["w"][0] + p["dense"]["b"]
    assert_close(pf.embedding(p, jnp.asarray(q), pf.Config(d_model=8, embedding="linear")), expected, 1e-5, "linear")


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm_np(p, x):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + pf.NORM_EPS)
    return y * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


@pytest.mark.parametrize("gated", [True, False])
def test_res_block_is_figure_3_4_written_out(gated):
    """x + Dense_out(branch(Norm(x)) * gelu(Dense_gate(Norm(x)))), or x + Dense_out(gelu(branch(Norm(x))))
    without the gate, in NumPy, on perturbed parameters (no zero bias, no unit scale)."""
    cfg = pf.Config(pooling=(), layers=(1,), gated=gated, **SMALL)
    p = perturbed(pf.res_block_init(jax.random.key(0), cfg, "mlp", 0.5))
    x = jax.random.normal(jax.random.key(1), (5, 2, 16))
    got, _ = pf.res_block(p, x, cfg, pf.mlp_branch)
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    dense = lambda q, v: v @ q["w"] + q["b"]
    x = np.asarray(x, np.float64)
    y = layer_norm_np(w["norm"], x)
    z = dense(w["branch"]["dense"], y)
    z = z * gelu_tanh(dense(w["gate"], y)) if gated else gelu_tanh(z)
    assert_close(got, x + dense(w["out"], z), 1e-5, "ResBlock")


def test_head_is_a_float32_layer_norm_then_the_dense_to_v_logits():
    cfg = pf.Config(pooling=(2,), layers=(1, 1), **SMALL)
    params = perturbed(init(jax.random.key(0), cfg))
    h = jax.random.normal(jax.random.key(1), (3, 16)).astype(jnp.bfloat16)  # a bf16 activation
    got = pf.head(params, h)
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    want = layer_norm_np(w["norm"], np.asarray(h, np.float64)) @ w["head"]["w"] + w["head"]["b"]
    assert got.dtype == jnp.float32 and got.shape == (3, 256)
    assert_close(got, want, 1e-4, "head")


def test_layer_norm_and_rms_norm_match_formulas():
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32) * 3 + 1
    p = {"scale": np.linspace(0.5, 2, 16, dtype=np.float32), "bias": np.ones(16, np.float32)}
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    assert_close(pf.norm(p, x, "layer"), p["scale"] * (x - mu) / np.sqrt(var + 1e-6) + 1, 1e-5, "layer")
    rms = np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    assert_close(pf.norm({"scale": p["scale"]}, x, "rms"), p["scale"] * x / rms, 1e-5, "rms")
    assert_close(pf.norm({}, x, "none"), x, 0, "none")


# ---------------------------------------------------------------- 3. causality


def random_tokens(seed, batch, length):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, length)), jnp.int32)


def perturbed(params, seed=7, size=0.05):
    """Parameters a fresh init would not give: every leaf moved by N(0, size^2) noise, so biases are off
    zero, norm scales off one, and every term of every path counts. An equivalence test on a fresh init
    cannot see a dropped bias (it is zero there); on these it can. (NumPy's noise: jax.random op by op
    would compile a program per leaf shape, seconds per config.)"""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64) + size * rng.normal(size=x.shape), x.dtype),
                        params)


def test_perturbed_moves_every_leaf_off_its_init():
    cfg = pf.Config(pooling=(2,), layers=(1, 1), **SMALL)
    params = init(jax.random.key(0), cfg)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).min()), params, perturbed(params))
    assert min(jax.tree.leaves(moved)) > 0  # no leaf kept its init value anywhere (zero biases, unit scales)


@settings(max_examples=4, deadline=None)
@given(pooling=st.lists(st.integers(1, 4), min_size=0, max_size=3), data=st.data(),
       skip=st.sampled_from(["short", "long"]), placement=st.sampled_from(["around", "after"]),
       complex_rnn=st.booleans())
def test_causality_changing_token_t_leaves_earlier_logits_unchanged(pooling, data, skip, placement, complex_rnn):
    layers = data.draw(st.lists(st.integers(0, 2), min_size=len(pooling) + 1, max_size=len(pooling) + 1))
    cfg = pf.Config(pooling=pooling, layers=layers, skip=skip, placement=placement, complex_rnn=complex_rnn,
                    scale=0.5, **SMALL)  # scale 0.5: every branch visibly contributes at init
    length = math.prod(pooling) * data.draw(st.integers(2, 4))
    params = perturbed(init(jax.random.key(data.draw(st.integers(0, 99))), cfg))
    x = random_tokens(0, 2, length)
    y = apply(params, x, cfg)
    for t in data.draw(st.lists(st.integers(0, length - 2), min_size=1, max_size=3, unique=True)):
        y2 = apply(params, x.at[:, t].set((x[:, t] + 101) % 256), cfg)
        assert_close(y2[:, : t + 1], y[:, : t + 1], 1e-6, f"logits before {t} moved")
        assert float(jnp.max(jnp.abs(y2[:, t + 1] - y[:, t + 1]))) > 1e-4, "the next logits must see token t"


def test_causality_with_attention_at_the_deepest_level():
    cfg = pf.Config(pooling=(2, 2), layers=(1, 1, 1), deepest="attention", scale=0.5, **SMALL)
    params = perturbed(init(jax.random.key(0), cfg))
    x = random_tokens(1, 2, 16)
    for t in (0, 5, 11):
        x2 = x.at[:, t].set((x[:, t] + 50) % 256)
        assert_close(apply(params, x2, cfg)[:, : t + 1], apply(params, x, cfg)[:, : t + 1], 1e-6, f"t={t}")


# ---------------------------------------------------------------- 4. stepping == parallel forward


def step_logits(params, cfg, x, state=None):
    state = pf.init_state(cfg, x.shape[0], x.shape[1]) if state is None else state
    step = jax.jit(lambda s, tok: pf.step(params, s, tok, cfg))
    prev, out = jnp.full((x.shape[0],), pf.SILENCE, x.dtype), []
    for t in range(x.shape[1]):
        logits, state = step(state, prev)
        out.append(logits)
        prev = x[:, t]
    return jnp.stack(out, 1), state


@pytest.mark.parametrize("changes", [  # every option's own branch of pf.step, two or three options a compile
    {}, {"complex_rnn": False, "skip": "long"}, {"placement": "after", "deepest": "attention"},
    {"embedding": "learned", "norm": "rms", "gated": False}, {"embedding": "linear", "groups": 2, "norm": "none"},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "baseline-shaped")
def test_step_by_step_equals_parallel_forward(changes):
    cfg = pf.Config(pooling=(2, 3, 2), layers=(1, 1, 1, 1), scale=0.5, **{**SMALL, **changes})
    params = perturbed(init(jax.random.key(0), cfg))  # zero biases at init would hide a bias dropped by step
    x = random_tokens(2, 2, 36)
    stepped, state = step_logits(params, cfg, x)
    full = apply(params, x, cfg)
    assert_close(stepped, full, 2e-5 * max(1.0, float(jnp.abs(full).max())), "step vs apply")  # float32 rounding
    assert int(state["pos"]) == 36


@pytest.mark.parametrize("changes", [{}, {"deepest": "attention", "complex_rnn": False, "norm": "rms"}],
                         ids=["baseline-shaped", "attention,real,rms"])
def test_every_parameters_gradient_is_how_the_loss_moves_when_that_parameter_moves(changes):
    """jax.grad of the loss against central differences, one parameter leaf at a time: a stop_gradient, a
    custom derivative or a cast that cuts a parameter off its gradient (or scales it) shows as a leaf whose
    gradient disagrees with how the loss moves. Each leaf moves by 1e-3 along its own random +-1 direction;
    the loss is differenced token by token in float64, so float32 rounding stays below the tolerance (clean
    code: under a quarter of it)."""
    cfg = pf.Config(pooling=(2,), layers=(1, 1), **{**SMALL, **changes})
    params = perturbed(init(jax.random.key(0), cfg), size=0.1)
    tokens = random_tokens(1, 2, 32)

    def token_nll(p):  # (B, S): -log p(token), as pf.nll_sum sums it
        return -jnp.take_along_axis(jax.nn.log_softmax(pf.apply(p, tokens, cfg)), tokens[..., None], -1)[..., 0]

    grads = jax.tree.leaves(jax.jit(jax.grad(lambda p: jnp.sum(token_nll(p))))(params))
    token_nll = jax.jit(token_nll)
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(params)[0])
    treedef, rng, eps = jax.tree.structure(params), np.random.default_rng(0), 1e-3
    for i, (path, leaf, grad) in enumerate(zip(paths, leaves, grads)):
        r = rng.choice([-1.0, 1.0], size=leaf.shape).astype(np.float32)
        moved = [jax.tree.unflatten(treedef, [*leaves[:i], leaf + s * eps * r, *leaves[i + 1:]])
                 for s in (1, -1)]
        up, down = (np.asarray(token_nll(p), np.float64) for p in moved)
        numeric, analytic = np.sum(up - down) / (2 * eps), float(jnp.sum(grad * r))
        assert abs(numeric - analytic) <= 0.02 * abs(analytic) + 0.01, \
            f"{jax.tree_util.keystr(path)}: gradient {analytic:.5g}, central difference {numeric:.5g}"


def test_attention_step_equals_apply_when_its_scores_are_large():
    """A trained model's attention can score far past 88, where float32's exp overflows: the deepest
    level's query and key weights 20x their perturbed values give scores up to ~900, and `pf.step`
    must still equal `pf.apply` (both softmaxes are shifted by their row's largest score)."""
    cfg = pf.Config(pooling=(2,), layers=(1, 1), deepest="attention", **SMALL)
    params = perturbed(init(jax.random.key(0), cfg))
    attention = params["skip_block"]["inner"]["layers"]["temporal"]["branch"]["attention"]
    for name in ("q", "k"):
        attention[name]["w"] = 20 * attention[name]["w"]
    x = random_tokens(3, 2, 16)
    stepped, _ = step_logits(params, cfg, x)
    full = apply(params, x, cfg)
    assert bool(jnp.all(jnp.isfinite(full)))
    assert_close(stepped, full, 2e-5 * max(1.0, float(jnp.abs(full).max())), "step vs apply")


def test_dropout_mask_keeps_one_minus_rate_and_rescales():
    keep = pf.dropout_mask(jax.random.key(0), 0.2, (1000, 2, 100))
    assert abs(float(keep.mean()) - 0.8) < 0.005  # 200,000 draws: 5 standard deviations is 0.0045
    x = jnp.ones((1000, 2, 100))
    assert_close(pf.dropout(x, 0.2, keep), jnp.where(keep, 1.25, 0.0), 1e-6, "inverted dropout")
    assert pf.dropout_mask(None, 0.2, (3,)) is None and pf.dropout_mask(jax.random.key(0), 0.0, (3,)) is None


# ---------------------------------------------------------------- 5. initialisation


# SPEC / thesis sec. 4.4: |a| ~ sqrt(U[min^2, max^2]), theta ~ U[0, phase max]; "long" is ours (pf.RINGS says why)
THESIS_RINGS = {"small": (0.9, 0.99, math.pi / 10), "half": (0.9, 0.99, math.pi), "full": (0.9, 0.99, 2 * math.pi),
                "circle": (0.01, 0.99, 2 * math.pi), "long": (0.99, 0.9999, math.pi / 10)}


@pytest.mark.parametrize("ring", list(THESIS_RINGS))
def test_init_puts_a_in_the_requested_ring(ring):
    assert set(pf.RINGS) == set(THESIS_RINGS)
    a_min, a_max, phase_max = THESIS_RINGS[ring]  # written here, not read from pf.RINGS
    p = pf.rglru_init(jax.random.key(0), pf.Config(ring=ring, d_rnn=4096))
    mag, phase = jax.nn.sigmoid(p["lambda_"]), p["theta"]
    assert float(mag.min()) >= a_min - 1e-6 and float(mag.max()) <= a_max + 1e-6
    assert float(phase.min()) >= 0 and float(phase.max()) <= phase_max
    # uniform over the ring's area: |a|^2 is uniform, so its mean is the midpoint of [min^2, max^2]
    assert abs(float(jnp.mean(mag**2)) - (a_min**2 + a_max**2) / 2) < 0.02 * (a_max**2 - a_min**2) + 1e-3
    assert float(phase.max()) > 0.9 * phase_max and float(phase.min()) < 0.1 * phase_max


def test_scale_zero_makes_every_resblock_and_up_pool_an_identity():
    cfg = pf.Config(pooling=(2, 2), layers=(1, 1, 1), scale=0.0, **SMALL)
    params = init(jax.random.key(0), cfg)
    h = jax.random.normal(jax.random.key(1), (8, 2, 16))
    # every ResBlock is the identity, and the up-pool adds zeros: the whole SkipBlock is the identity
    assert_close(pf.skip_block(params["skip_block"], h, cfg), h, 0, "SkipBlock")
    up = pf.up_pool(params["skip_block"]["up_pool"], h)
    assert_close(up, jnp.zeros_like(up), 0, "up-pool")
    block = jax.tree.map(lambda v: v[0], params["skip_block"]["before"]["temporal"])
    assert_close(pf.res_block(block, h, cfg, pf.temporal_branch(cfg))[0], h, 0, "ResBlock")


@pytest.mark.parametrize("placement,before,after", [("around", 1, 1), ("after", 0, 2)])
def test_placement_puts_l_k_layers_on_each_side_of_the_pooling_or_all_2_l_k_after_it(placement, before, after):
    """Thesis Table 4.1's placement ablation, from the parameter tree: at every pooled level (l = 1, 2),
    `around` stacks l_k layers before the DownPool and l_k after the UpPool; `after` stacks all 2 l_k after."""
    cfg = pf.Config(pooling=(2, 2), layers=(1, 2, 1), placement=placement, d_model=16, d_rnn=64)
    params = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
    for level, n in ((params["skip_block"], 1), (params["skip_block"]["inner"], 2)):
        for side, count in (("before", before * n), ("after", after * n)):
            assert {leaf.shape[0] for leaf in jax.tree.leaves(level.get(side))} == ({count} if count else set()), side
    assert {leaf.shape[0] for leaf in jax.tree.leaves(params["skip_block"]["inner"]["inner"]["layers"])} == {1}


def test_default_scale_is_one_over_branches_into_the_stream():
    cfg = pf.Config(pooling=(2,), layers=(3, 2), d_model=128)
    params = init(jax.random.key(0), cfg)
    outer, deepest = params["skip_block"], params["skip_block"]["inner"]["layers"]
    # SkipBlock: 2*3 layers x 2 ResBlocks + the up-pool = 13 branches; deepest: 2 layers x 2 = 4
    # Tolerance: 5 standard errors of a sample standard deviation, 5 / sqrt(2 n) relative (a normal's;
    # the truncated normal's is smaller): 1.1-1.6% for the 49k-98k Dense_out weights, where 12
    # branches instead of 13 would be 4.1% off. The up-pool's 256 weights only allow 22%.
    # The down-pool is not a branch into a stream: LeCun normal (scale 1), n_in = F D/G = 2.
    for w, n_in, branches in [(outer["before"]["mlp"]["out"]["w"], 256, 13), (outer["after"]["temporal"]["out"]["w"], 128, 13),
                              (deepest["mlp"]["out"]["w"], 256, 4), (outer["up_pool"]["w"], 2, 13),
                              (outer["down_pool"]["w"], 2, 1)]:
        expected = math.sqrt(1 / branches / n_in)
        tol = 5 / math.sqrt(2 * w.size)
        assert abs(float(jnp.std(w)) / expected - 1) < tol, (w.shape, float(jnp.std(w)), expected, tol)


def test_learned_embedding_table_starts_at_unit_norm_rows():
    table = pf.embedding_init(jax.random.key(0), pf.Config(embedding="learned"))["table"]  # (256, 128)
    assert abs(float(jnp.std(table)) * math.sqrt(128) - 1) < 5 / math.sqrt(2 * table.size)  # std 1/sqrt(D)


# ---------------------------------------------------------------- dropout


def test_dropout_only_with_a_key():
    """No key: exactly the same model with dropout=0. A key: dropout, the same masks for the same key,
    others for another."""
    cfg = pf.Config(pooling=(2,), layers=(1, 1), d_model=16, d_rnn=64, dropout=0.5, scale=1.0)
    params = init(jax.random.key(0), cfg)
    x = random_tokens(3, 2, 8)
    plain = apply(params, x, dataclasses.replace(cfg, dropout=0.0))
    assert_close(apply(params, x, cfg), plain, 0, "no key means no dropout")
    a, b = apply(params, x, cfg, key=jax.random.key(1)), apply(params, x, cfg, key=jax.random.key(2))
    assert_close(apply(params, x, cfg, key=jax.random.key(1)), a, 0, "one key, one set of masks")
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3 and float(jnp.max(jnp.abs(a - plain))) > 1e-3
    # each clip of a batch its own masks: two copies of one clip come out differently
    twins = apply(params, jnp.concatenate([x[:1], x[:1]]), cfg, key=jax.random.key(1))
    assert float(jnp.max(jnp.abs(twins[0] - twins[1]))) > 1e-3


def test_every_resblock_draws_a_mask_of_its_own(monkeypatch):
    """Two layers before the pooling, two after, two at the deepest level: 12 ResBlocks, 12 different
    masks (the temporal and MLP blocks of a layer, and the layers before and after, share no key)."""
    cfg = pf.Config(pooling=(2,), layers=(2, 2), d_model=16, d_rnn=64, dropout=0.5)
    params, seen, draw = init(jax.random.key(0), cfg), [], pf.dropout_mask

    def recording(key, rate, shape):
        keep = draw(key, rate, shape)
        jax.debug.callback(lambda k: seen.append(np.asarray(k).tobytes()), keep)
        return keep
    monkeypatch.setattr(pf, "dropout_mask", recording)
    jax.block_until_ready(pf.apply(params, random_tokens(0, 2, 8), cfg, key=jax.random.key(1)))
    jax.effects_barrier()
    assert len(seen) == 12 and len(set(seen)) == 12


def test_dropout_masks_are_drawn_once_outside_the_rematerialised_blocks():
    """In the jaxpr of the training gradient, every random_bits (a mask's draw) sits outside the
    remat (jax.checkpoint) regions: one per ResBlock of the scanned Layer body (2), and the backward
    pass's recomputation draws none again."""
    cfg = pf.Config(pooling=(), layers=(2,), d_model=16, d_rnn=64, dropout=0.5)
    params = jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))  # traced, not computed
    x = random_tokens(0, 2, 8)
    loss = lambda p, key: jnp.sum(pf.apply(p, x, cfg, key=key))
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params, jax.random.key(1)).jaxpr
    draws, remats = [], []

    def walk(jaxpr, in_remat):
        for eqn in jaxpr.eqns:
            remat = eqn.primitive.name in ("checkpoint", "remat", "remat2")
            if remat:
                remats.append(eqn)
            if eqn.primitive.name == "random_bits":
                draws.append(in_remat)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                        walk(sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub, in_remat or remat)

    walk(jaxpr, False)
    assert remats, "no remat region: the ResBlocks are no longer rematerialised"
    assert draws == [False] * 2, f"mask draws (True: inside a remat region): {draws}"


# ---------------------------------------------------------------- 6. bad configs


@pytest.mark.parametrize("changes,words", [
    ({"pooling": (2, 4), "layers": (4, 4)}, ["layers [4, 4]", "3"]),
    ({"d_rnn": 100}, ["d_rnn=100", "32"]),
    ({"d_rnn": 96}, ["d_rnn=96", "64"]),  # complex: R/2 = 48 is not a multiple of 32
    ({"norm": "batch"}, ["norm", "'batch'"]),
    ({"ring": "square"}, ["ring", "'square'"]),
    ({"groups": 3}, ["groups=3", "d_model=128"]),
    ({"pooling": (2, 0), "layers": (1, 1, 1)}, ["pooling [2, 0]"]),
    ({"dropout": 1.0}, ["dropout=1.0", "[0, 1)"]),  # every unit dropped: an error line, not a run that cannot learn
    ({"deepest": "attention", "d_model": 6}, ["d_model=6", "4 attention heads"]),  # not an einops error in apply
])
def test_bad_config_raises_value_error_naming_the_numbers(changes, words):
    with pytest.raises(ValueError) as err:
        pf.Config(**changes)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_length_not_divisible_by_pooling_product_is_refused():
    cfg = pf.Config(pooling=(2, 4, 4, 5), layers=(0, 0, 0, 0, 0), d_model=16, d_rnn=64)
    params = init(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match=r"length 1000 .* 2\*4\*4\*5 = 160"):
        pf.apply(params, jnp.zeros((1, 1000), jnp.int32), cfg)


# ---------------------------------------------------------------- attention block, gate init, init_state


def test_rope_scores_depend_only_on_the_relative_position():
    """<rope(q, m), rope(k, n)> is a function of m - n; rope keeps norms and leaves the second half."""
    q, k = jax.random.normal(jax.random.key(0), (2, 5, 32))
    m, n = jnp.arange(5) * 7 + 3, jnp.arange(5) * 2
    dot = lambda a, b: jnp.sum(a * b, -1)
    for shift in (1, 100, 9999):
        assert_close(dot(pf.rope(q, m + shift), pf.rope(k, n + shift)), dot(pf.rope(q, m), pf.rope(k, n)),
                     1e-3, f"shift {shift}")
    assert_close(jnp.linalg.norm(pf.rope(q, m), axis=-1), jnp.linalg.norm(q, axis=-1), 1e-4, "norm")
    assert_close(pf.rope(q, m)[:, 16:], q[:, 16:], 0, "second half")
    assert float(jnp.max(jnp.abs(pf.rope(q, m)[:, :16] - q[:, :16]))) > 0.1, "the first half must rotate"


def test_attention_branch_equals_numpy_reference():
    """out(softmax(rope(q) rope(k)^T / sqrt(Dh) + causal) v) * gelu(gate(y)), q/k/v bias-free, written
    with NumPy: 2 x 2 rotations of pairs (i, i + 8) by pos / 32000^(i/8) on the first 16 of 32 dims."""
    d, s_len = 128, 6
    cfg = pf.Config(pooling=(), layers=(1,), deepest="attention")
    p = jax.tree.map(lambda v: np.asarray(v, np.float64),  # perturbed: the output and gate biases off zero
                     perturbed(pf.res_block_init(jax.random.key(1), cfg, "attention", 1.0)["branch"]))
    y = np.random.default_rng(0).normal(size=(s_len, 2, d))
    a = p["attention"]
    assert set(a["q"]) == set(a["k"]) == set(a["v"]) == {"w"} and set(a["o"]) == {"w", "b"}

    def rot(x, pos):
        x = x.copy()
        for i in range(8):
            c, s = np.cos(pos / 32000 ** (i / 8)), np.sin(pos / 32000 ** (i / 8))
            x[..., i], x[..., i + 8] = x[..., i] * c - x[..., i + 8] * s, x[..., i + 8] * c + x[..., i] * s
        return x

    out = np.zeros((s_len, 2, d))
    for b in range(2):
        k = np.stack([rot(y[t, b] @ a["k"]["w"], t) for t in range(s_len)])
        v = y[:, b] @ a["v"]["w"]
        for t in range(s_len):
            heads = []
            for h in range(4):
                q = rot(y[t, b] @ a["q"]["w"][:, 32 * h:32 * (h + 1)], t)
                w = np.exp(k[: t + 1] @ q / np.sqrt(32))
                heads.append((w / w.sum()) @ v[: t + 1])
            gate = y[t, b] @ p["gate"]["w"] + p["gate"]["b"]
            gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
            out[t, b] = (np.concatenate(heads) @ a["o"]["w"] + a["o"]["b"]) * gelu
    branch = pf.temporal_branch(cfg)(jax.tree.map(jnp.asarray, p), jnp.asarray(y, jnp.float32))[0]
    assert_close(branch, out, 1e-4, "attention branch")


def test_gate_init_follows_flax_fan_in_of_the_block_diagonal_kernel():
    """The author's BlockDiagonalLinear: W (32, R/32, N/32) ~ fan-in R, b (32, N/32) ~ fan-in 32
    (variance_scaling counts every axis but the last); both truncated normals of variance 1/fan-in."""
    gates = jax.vmap(lambda k: pf.block_diagonal_init(k, 2048, 1024))(jax.random.split(jax.random.key(0), 64))
    assert gates["w"].shape == (64, 32, 64, 32) and gates["b"].shape == (64, 1024)
    for name, fan_in in (("w", 2048), ("b", 32)):  # >= 65,536 draws each: the std to ~0.3%
        std, expected = float(jnp.std(gates[name])), 1 / math.sqrt(fan_in)
        assert abs(std - expected) < 0.015 * expected, f"{name}: std {std:.4g}, 1/sqrt({fan_in}) = {expected:.4g}"
        assert float(jnp.max(jnp.abs(gates[name]))) <= 2 * expected / 0.87962566103423978 + 1e-6, "truncated at 2"
    rglru = pf.rglru_init(jax.random.key(0), pf.Config())  # R = 256: the gates' std is 1/16
    assert abs(float(jnp.std(rglru["gate_x"]["w"])) - 1 / 16) < 0.05 / 16


def test_init_state_needs_no_length_without_attention():
    """Pooling (3, 2) does not divide 16,000; the RG-LRU's state does not depend on the length."""
    cfg = pf.Config(pooling=(3, 2), layers=(0, 0, 1), **SMALL)
    params = init(jax.random.key(0), cfg)
    state = pf.init_state(cfg, 2)
    x = random_tokens(5, 2, 12)
    stepped, _ = step_logits(params, cfg, x, state)
    assert_close(stepped, apply(params, x, cfg), 2e-5, "step vs apply, pooling (3, 2)")


def test_init_state_with_attention_asks_for_a_length_that_fits_the_pooling():
    cfg = pf.Config(pooling=(3, 2), layers=(1, 1, 1), deepest="attention", **SMALL)
    with pytest.raises(ValueError, match="needs seq_len"):
        pf.init_state(cfg, 2)
    with pytest.raises(ValueError, match=r"length 16000 .* 3\*2 = 6"):
        pf.init_state(cfg, 2, 16000)
    cache = pf.init_state(cfg, 2, 60)["skip_block"]["inner"]["inner"]["layers"]
    assert cache["k"].shape == (1, 10, 2, 4)  # L, S / 6, B, D / HEADS
