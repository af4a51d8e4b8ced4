"""Mixed precision (--dtype bfloat16): what stays float32, step == apply, and training that tracks
float32. Tolerances come from bf16's rounding: 8 significant bits, a relative error of up to
2^-8 ~ 0.4% per rounding of an activation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pf
import sample
import train
from test_bench import inner_jaxprs
from test_pf import perturbed

BF16 = jnp.bfloat16
SMALL = dict(d_model=32, d_rnn=64, dropout=0.0)


def equations(jaxpr):
    """Every equation of a jaxpr, those of inner jaxprs (scan and cond bodies, remat, custom VJPs) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in inner_jaxprs(eqn):
            yield from equations(sub)


def float_dtypes(eqn):
    return {str(v.aval.dtype) for v in eqn.outvars if jnp.issubdtype(v.aval.dtype, jnp.inexact)}


@pytest.mark.parametrize("complex_rnn", [True, False])
def test_rglru_coefficients_and_scan_stay_float32_on_bf16_input(complex_rnn):
    cfg = pf.Config(**SMALL, complex_rnn=complex_rnn)
    p = pf.rglru_init(jax.random.key(0), cfg)
    x = jnp.ones((16, 2, cfg.d_rnn), BF16)
    jaxpr = jax.make_jaxpr(lambda p, x: pf.rglru(p, x, complex_rnn))(p, x).jaxpr
    eqns = list(equations(jaxpr))
    # everything between the input's cast up and the output's cast down is float32 / complex64
    inside = [e for e in eqns if not (e.primitive.name == "convert_element_type" and e.params["new_dtype"] == BF16)]
    assert {d for e in inside for d in float_dtypes(e)} <= {"float32", "complex64"}
    assert any(e.primitive.name == "scan" for e in eqns) and jaxpr.outvars[0].aval.dtype == BF16


def test_rope_angles_stay_float32_on_bf16_input_at_positions_past_256():
    """bf16 holds integers exactly only up to 256: the attention of a long deepest level (the music presets'
    has thousands of pooled steps) must rotate by float32 angles, so a bf16 input at positions 257-4000
    gives the float32 rotation to bf16's rounding (a bf16 angle is off by up to 8 radians at 4000)."""
    x = jax.random.normal(jax.random.key(0), (5, 2, 16))
    pos = jnp.array([257, 259, 1001, 2999, 4000])[:, None]
    want = np.asarray(pf.rope(x, pos))
    got = pf.rope(x.astype(BF16), pos)
    assert got.dtype == BF16
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, atol=0.03 * np.abs(want).max())


def test_bf16_model_runs_its_matmuls_in_bf16_and_keeps_norms_head_and_state_float32():
    cfg = pf.Config(pooling=(2,), layers=(1, 1), **SMALL)
    params = pf.init(jax.random.key(0), cfg)
    x = jnp.zeros((2, 8), jnp.int32)
    eqns = list(equations(jax.make_jaxpr(lambda p, x: pf.apply(p, x, cfg, dtype=BF16))(params, x).jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    bf16_dots = [e for e in dots if {str(v.aval.dtype) for v in e.invars} == {"bfloat16"}]
    f32_dots = [e for e in dots if {str(v.aval.dtype) for v in e.invars} == {"float32"}]
    assert len(bf16_dots) + len(f32_dots) == len(dots)  # no mixed-dtype matmul
    # float32 matmuls: the RG-LRU's two gates in each of the 3 temporal blocks, and the head
    assert len(f32_dots) == 3 * 2 + 1 and len(bf16_dots) > len(f32_dots)
    # the norms' statistics are float32 (jnp.mean accumulates bf16 in float32 anyway, so look at
    # the 1/std each norm computes: 2 per layer, 3 layers, and the head's); so are the logits
    rsqrts = [e for e in eqns if e.primitive.name == "rsqrt"]
    assert len(rsqrts) == 2 * 3 + 1 and all(float_dtypes(e) == {"float32"} for e in rsqrts)
    assert jax.eval_shape(lambda: pf.apply(params, x, cfg, dtype=BF16)).dtype == jnp.float32
    # the parameters a bf16 forward computes with: float32 in the RG-LRU, the norms and the head
    cast = pf.compute_params(params, BF16)
    assert cast["head"]["w"].dtype == cast["norm"]["scale"].dtype == jnp.float32
    assert cast["skip_block"]["before"]["temporal"]["branch"]["rglru"]["lambda_"].dtype == jnp.float32
    assert cast["skip_block"]["before"]["temporal"]["branch"]["dense_in"]["w"].dtype == BF16
    # a real RG-LRU's state stays float32 too, and step returns the state types it was given
    real = dataclasses.replace(cfg, complex_rnn=False)
    state = pf.init_state(real, 2, 8, dtype=BF16)
    assert state["skip_block"]["before"].dtype == jnp.float32
    new = jax.eval_shape(lambda: pf.step(pf.init(jax.random.key(0), real), state, jnp.zeros((2,), jnp.int32), real, BF16))[1]
    assert jax.tree.map(lambda a: a.dtype, new) == jax.tree.map(lambda a: a.dtype, state)
    # the recurrence state stays complex64 while the pooling buffers take the compute dtype
    state = pf.init_state(cfg, 2, 8, dtype=BF16)
    assert state["skip_block"]["before"].dtype == jnp.complex64
    assert state["skip_block"]["pool_sum"].dtype == BF16
    logits, new = jax.eval_shape(lambda: pf.step(params, state, jnp.zeros((2,), jnp.int32), cfg, BF16))
    assert logits.dtype == jnp.float32
    assert jax.tree.map(lambda a: a.dtype, new) == jax.tree.map(lambda a: a.dtype, state)


def test_bf16_sampler_runs_every_level_in_bf16():
    """sample.generate(dtype=bfloat16): the pooled levels' buffers hold bf16, so every level's matmuls run in
    bf16 as apply's do; float32 only in the RG-LRU's gates (2 per temporal block, 3 blocks) and the head."""
    cfg = pf.Config(pooling=(2,), layers=(1, 1), **SMALL)
    params = pf.init(jax.random.key(0), cfg)
    run = lambda p: sample.generate(p, cfg, jax.random.key(0), jnp.zeros((2, 8), jnp.int32), 0, dtype="bfloat16")
    dots = [e for e in equations(jax.make_jaxpr(run)(params).jaxpr) if e.primitive.name == "dot_general"]
    kinds = [tuple(sorted({str(v.aval.dtype) for v in e.invars})) for e in dots]
    assert kinds.count(("float32",)) == 3 * 2 + 1 and kinds.count(("bfloat16",)) + 7 == len(kinds), kinds


@pytest.mark.parametrize("deepest", ["rglru", "attention"])
def test_step_equals_apply_in_bf16(deepest):
    """Both paths round differently (other op orders and shapes), so they agree only to bf16's
    precision: the logits here are O(1-5), and each path lands within ~0.05 of the float32 result.
    A wrong state, offset or pooling buffer moves them by O(1)."""
    cfg = pf.Config(pooling=(2, 3), layers=(1, 1, 1), scale=0.5, deepest=deepest, **SMALL)
    params = perturbed(pf.init(jax.random.key(0), cfg))  # biases off zero: a bias step drops would show
    x = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
    full32 = pf.apply(params, x, cfg)
    full16 = pf.apply(params, x, cfg, dtype=BF16)

    def body(state, prev):
        logits, state = pf.step(params, state, prev, cfg, BF16)
        return state, logits

    prev = jnp.concatenate([jnp.full((2, 1), pf.SILENCE), x[:, :-1]], 1).T
    stepped = jax.lax.scan(body, pf.init_state(cfg, 2, 24, dtype=BF16), prev)[1].transpose(1, 0, 2)
    scale = float(jnp.abs(full32).max())
    assert scale > 1.0  # logits large enough for the tolerance to mean something
    for name, a, b, tol in (("step16 vs apply16", stepped, full16, 0.1), ("step16 vs f32", stepped, full32, 0.1),
                            ("apply16 vs f32", full16, full32, 0.1)):
        diff = float(jnp.abs(a - b).max())
        assert diff < tol, f"{name}: largest difference {diff:.3g} > {tol}"
    assert float(jnp.abs(full16 - full32).max()) > 0  # bf16 really ran: it is not the float32 result


def test_bf16_loss_is_the_float32_cross_entropy_of_the_bf16_models_logits():
    """Under bf16 the model computes in bf16 and hands float32 logits to the loss, whose log-softmax and
    cross-entropy stay float32: nll_sum equals the float64 NumPy cross-entropy of pf.apply's bf16 logits
    to float32 rounding (a bf16 log-softmax put it 3e-4 off here: 8 significant bits)."""
    cfg = pf.Config(pooling=(2,), layers=(1, 1), **SMALL)
    params = perturbed(pf.init(jax.random.key(0), cfg), size=0.2)  # spread logits: a loss far from uniform
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, (2, 64)).astype(np.int32)
    mask = np.ones((2, 64), np.float32)
    mask[1, 40:] = 0
    logits = np.asarray(pf.apply(params, jnp.asarray(tokens), cfg, dtype=BF16), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.sum(np.take_along_axis(logp, tokens[..., None], -1)[..., 0] * mask)
    total, count = pf.nll_sum(params, jnp.asarray(tokens), jnp.asarray(mask), cfg, dtype="bfloat16")
    assert float(count) == 104 and np.std(logits) > 0.5
    assert abs(float(total) - want) < 1e-5 * want, (float(total), want)  # measured 8e-8 relative; a bf16 loss: 3e-4


def test_bf16_training_loss_tracks_float32():
    """80 steps of a tiny model on a learnable toy task (a noisy sine wave's tokens), in float32 and
    in bf16 from the same init and data. The two trajectories round differently and drift apart
    step by step; what must hold is that bf16 learns as float32 does: the loss falls by over 2 bits
    in both, and the mean loss over the last 20 steps agrees within 0.02 bits (bf16's rounding of
    activations, ~0.4% each, averages out in a loss over 512 tokens: measured 1e-4 bits here)."""
    cfg = pf.Config(pooling=(2,), layers=(1, 1), **SMALL)
    rng = np.random.default_rng(0)
    t = np.arange(64)
    phase = rng.uniform(0, 2 * np.pi, (80, 8, 1))
    tokens = np.clip(128 + 100 * np.sin(2 * np.pi * t / 16 + phase) + rng.normal(0, 3, (80, 8, 64)), 0, 255)
    tokens = tokens.astype(np.uint8)
    mask = np.ones((8, 64), bool)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    curves = {}
    tc = train.TrainConfig(batch_size=8, warmup=10, lr=3e-3)
    init = jax.device_get(jax.jit(lambda: train.init_state(cfg, tc))())  # one init for both runs
    for dtype in ("float32", "bfloat16"):
        tc = dataclasses.replace(tc, dtype=dtype)
        # separate buffers (the step donates them), placed as the step's output is: one compile each
        state = jax.device_put(init, NamedSharding(mesh, P()))
        step = train.make_train_step(cfg, tc, mesh)
        losses = []
        for batch in tokens:
            state, m = step(state, batch, mask, 1.0)
            losses.append(float(m["loss_bits"]))
        curves[dtype] = np.array(losses)
    f32, b16 = curves["float32"], curves["bfloat16"]
    assert f32[:5].mean() - f32[-20:].mean() > 2.0 and b16[:5].mean() - b16[-20:].mean() > 2.0
    gap = abs(f32[-20:].mean() - b16[-20:].mean())
    assert gap < 0.02, f"bf16 ends {gap:.4f} bits from float32"
    assert np.abs(f32 - b16).max() > 0  # the bf16 run is not the float32 run


def test_bad_dtype_is_refused_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--dtype", "float16"])
    assert e.value.code == 2 and "'float16' is not one of float32, bfloat16" in capsys.readouterr().err
    assert train.parse_args(["--dtype", "bfloat16"])[1].dtype == "bfloat16"
