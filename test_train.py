"""train.py: learning, multi-device and multi-process equivalence, accumulation, crash safety,
config mismatch and NaN handling, on a tiny model and the tiny built-in dataset."""
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import checkpoint
import data
import pf
import sample
import train

HERE = os.path.dirname(os.path.abspath(__file__))
# The training loop's tests run a one-ResBlock model without pooling: its step compiles in about half the time
# of a pooled one's, and what they check (steps, devices, resume, logs) does not depend on the model's shape.
# A pooled model is trained by test_a_memorised_spoken_digit_is_said_back_by_the_sampler and the full-size leg.
TINY_MODEL = ["--pooling", "--layers", "1", "--d-model", "16", "--d-rnn", "64", "--dropout", "0.1"]
STEPS = 12


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    data.load("sc09-espeak", d, "tiny")  # build once for every test here
    return d


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax-cache"))


def args(data_dir, out, *extra):
    return ["--dataset", "sc09-espeak", "--size", "tiny", "--data-dir", data_dir, "--out", out, "--seq-len", "160",
            "--batch-size", "8", "--steps", str(STEPS), "--warmup", "4", "--log-every", "1", "--ckpt-every", "3",
            "--eval-clips", "8", "--report-samples", "0", *TINY_MODEL, *extra]


def run(argv, cache, devices=1, env=None, wait=True, prefix=""):
    """train.py in a fresh process (with `devices` forced CPU devices), sharing a compilation cache."""
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": flags,
           "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", **(env or {})}
    code = prefix + "import sys, train; sys.exit(train.main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=HERE, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not wait:
        return proc
    out = proc.communicate(timeout=300)[0]
    return proc.returncode, out


def final_params(out):
    meta, arrays = train.read_checkpoint(train.checkpoints(out)[-1])
    return meta, {k: v for k, v in arrays.items() if k.startswith(("params/", "ema/"))}


def log_records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_params(a, b, tol):
    """Every array of a within tol of b's. A NaN anywhere fails: `not diff <= tol` is true for NaN,
    where Python's max() over the per-key differences would have skipped it."""
    assert a.keys() == b.keys()
    diffs = {k: float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])), initial=0.0)) for k in a}
    bad = {k: d for k, d in diffs.items() if not d <= tol}
    assert not bad, f"largest parameter differences > {tol}: {dict(sorted(bad.items())[:5])}"


def test_assert_same_params_fails_on_a_nan_in_any_array():
    a = {"w": np.zeros(3), "z": np.zeros(2)}
    assert_same_params(a, {"w": np.zeros(3), "z": np.full(2, 1e-7)}, 1e-6)
    for key in ("w", "z"):  # a NaN in the first array and in a later one
        b = {**a, key: np.array([0.0, np.nan, 0.0][: a[key].size])}
        with pytest.raises(AssertionError, match=key):
            assert_same_params(a, b, 1e-6)
        with pytest.raises(AssertionError, match=key):
            assert_same_params(b, a, 1e-6)


@pytest.fixture(scope="session")
def reference(data_dir, compile_cache, tmp_path_factory):
    """An uninterrupted run of STEPS steps on one device: what every other run must reproduce."""
    out = str(tmp_path_factory.mktemp("reference"))
    code, log = run(args(data_dir, out), compile_cache)
    assert code == 0, log
    return out


# ---------------------------------------------------------------- 1. it learns


def test_training_lowers_validation_nll(data_dir, tmp_path):
    out = str(tmp_path / "run")
    argv = args(data_dir, out, "--eval-every", "10", "--eval-clips", "20", "--lr", "0.005", "--ema", "0.5")
    argv[argv.index("--steps") + 1] = "60"
    assert train.main(argv) == 0
    vals = [r["val_nll_bits"] for r in log_records(out) if "val_nll_bits" in r]
    assert len(vals) == 6
    assert vals[-1] < vals[0] - 0.5, vals
    assert vals[-1] < 8.0, vals


def test_a_memorised_spoken_digit_is_said_back_by_the_sampler(data_dir):
    """End to end, against the data itself: the training step memorises the loudest 1,200 tokens
    (75 ms of a voiced digit) of a built-in clip, and the recurrent sampler, given its first 6
    tokens (one deepest pooled step) and drawing at temperature 0.01, says the other 1,194 back
    token for token from the EMA weights. The untrained model, sampled the same way, does not."""
    ds = data.load("sc09-espeak", data_dir, "tiny")
    clip, length = ds.train.tokens[0], ds.train.lengths[0]
    energy = np.convolve(data.mu_law_decode(clip[:length]).astype(np.float64) ** 2, np.ones(1200), "valid")
    start = int(np.argmax(energy))
    segment = clip[start:start + 1200].astype(np.int32)
    assert len(np.unique(segment)) > 100  # a loud, varied waveform, not a near-constant stretch
    cfg = pf.Config(pooling=(2, 3), layers=(1, 1, 1), d_model=16, d_rnn=64, dropout=0.0)
    tc = train.TrainConfig(batch_size=1, lr=0.01, warmup=10, ema=0.9)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state = jax.device_put(jax.jit(lambda: train.init_state(cfg, tc))(), NamedSharding(mesh, P()))
    untrained = jax.tree.map(jnp.copy, state["ema"])  # (the step donates the state's buffers)
    step = train.make_train_step(cfg, tc, mesh)
    tokens, mask = jnp.asarray(segment[None]), jnp.ones((1, 1200), jnp.float32)
    for _ in range(200):
        state, stats = step(state, tokens, mask, np.float32(1.0))
    assert float(stats["loss_bits"]) < 0.1

    def said_back(params):
        drawn, _ = sample.generate(params, cfg, jax.random.key(0), tokens, 6, temperature=0.01)
        return float(np.mean(np.asarray(drawn)[0, 6:] == segment[6:]))

    assert said_back(state["ema"]) == 1.0
    assert said_back(untrained) < 0.1


# ---------------------------------------------------------------- 2-3. devices, processes, accumulation


def logged_tokens(out):
    """Each logged step's tokens: its tokens_per_s times its time."""
    return [r["tokens_per_s"] * r["ms_per_step"] / 1000 for r in log_records(out) if "loss_bits" in r]


def test_eight_devices_take_the_same_steps_as_one(reference, data_dir, compile_cache, tmp_path):
    """The same losses and weights as one device, and the same tokens logged per step: the whole
    global batch's, not one device's share."""
    out = str(tmp_path / "eight")
    code, log = run(args(data_dir, out), compile_cache, devices=8)
    assert code == 0 and "8 devices" in log, log
    ref_losses = [r["loss_bits"] for r in log_records(reference) if "loss_bits" in r]
    losses = [r["loss_bits"] for r in log_records(out) if "loss_bits" in r]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(logged_tokens(out), logged_tokens(reference), rtol=1e-6)
    assert min(logged_tokens(reference)) == pytest.approx(8 * 160)  # (tokens/s x ms: rounded) every clip is longer than 160 samples: no padding
    assert_same_params(final_params(out)[1], final_params(reference)[1], 1e-5)


def test_two_processes_form_one_mesh_and_take_the_same_steps(reference, data_dir, compile_cache, tmp_path):
    port = 20000 + os.getpid() % 20000
    procs = [run(args(data_dir, str(tmp_path / "multi")), compile_cache, devices=1, wait=False,
                 env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "2 devices, 2 processes" in outputs[0], outputs[0]
    ref_losses = [r["loss_bits"] for r in log_records(reference) if "loss_bits" in r]
    losses = [r["loss_bits"] for r in log_records(str(tmp_path / "multi")) if "loss_bits" in r]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(logged_tokens(str(tmp_path / "multi")), logged_tokens(reference), rtol=1e-6)
    assert_same_params(final_params(str(tmp_path / "multi"))[1], final_params(reference)[1], 1e-5)


TINY_CFG = pf.Config(pooling=(), layers=(1,), d_model=16, d_rnn=64, dropout=0.0)  # as TINY_MODEL; no dropout: same masks


def batch_mean_nll(params, tokens, mask, cfg):
    """The loss of the recipe written out on its own: the mean over the batch's unmasked tokens of
    -log p(token) in nats, from pf.apply's logits (not train.nll_sum)."""
    logp = jax.nn.log_softmax(pf.apply(params, tokens, cfg))
    nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)


reference_grad = jax.jit(jax.value_and_grad(batch_mean_nll), static_argnums=3)


def snapshot(tree):
    """A flat NumPy copy (the train step donates its input state)."""
    return {k: np.array(v, copy=True) for k, v in train.flatten(tree).items()}


def global_norm(flat):
    return math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in flat.values()))


@pytest.fixture(scope="module")
def readout_steps(data_dir):
    """Three train steps with 4 microbatches of 2, EMA 0.8 and skip_norm set between the gradient
    norms (by jax.grad) of two batches. The optimiser is swapped for SGD with learning rate 1 and a
    momentum trace of decay 0, whose update is exactly -gradient and whose state is the last
    gradient: the accumulated gradient can be read off the parameters (AdamW's first step is
    invariant to the gradient's scale, so it would hide a wrong divisor).
    Every batch has one row's tail masked (uneven token counts per microbatch: the mean must still be
    over the batch). Step 0: the batch of largest gradient norm (skipped); step 1: the smallest;
    step 2: another.
    -> dict: skip_norm, norms (reference) of steps 0 and 1, reference (loss, grads) of step 1, states
    (before and after each step, flat NumPy), metrics of each step."""
    ds = data.load("sc09-espeak", data_dir, "tiny", seq_len=160)
    batches = [(tokens.astype(np.int32), mask.copy()) for tokens, mask in data.batches(ds.train, 8, seed=0)][:6]
    for _, mask in batches:
        mask[3, 100:] = False
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "make_optimizer",
                      lambda tc: (optax.sgd(1.0, momentum=0.0), optax.constant_schedule(1.0)))
        tc = train.TrainConfig(batch_size=8, microbatch=2, ema=0.8)
        mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
        # placed as the step's output is (as train.py does): the step compiles once
        state = jax.device_put(jax.jit(lambda: train.init_state(TINY_CFG, tc))(), NamedSharding(mesh, P()))
        refs = [reference_grad(state["params"], tokens, mask, TINY_CFG) for tokens, mask in batches]
        norms = [global_norm(snapshot(g)) for _, g in refs]
        order = np.argsort(norms)
        skip_norm = (norms[order[-1]] + norms[order[-2]]) / 2
        step = train.make_train_step(TINY_CFG, dataclasses.replace(tc, skip_norm=skip_norm), mesh)
        states, metrics = [snapshot(state)], []
        for i in (order[-1], order[0], order[1]):
            state, m = step(state, *batches[i], 1.0)
            states.append(snapshot(state))
            metrics.append(jax.device_get(m))
    return {"skip_norm": skip_norm, "norms": (norms[order[-1]], norms[order[0]]), "reference": refs[order[0]],
            "states": states, "metrics": metrics}


def part(flat, prefix):
    return {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + "/")}


def test_four_microbatches_of_two_give_the_update_of_one_batch_of_eight(readout_steps):
    """The gradient accumulated over 4 microbatches of 2 rows (read off the SGD update of step 1)
    equals jax.grad of the whole batch's mean NLL; so do the loss and the gradient norm."""
    ref_loss, ref_grads = readout_steps["reference"]
    ref_grads = snapshot(ref_grads)
    before, after = (part(s, "params") for s in readout_steps["states"][1:3])
    grads = {k: before[k] - after[k] for k in before}
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    assert scale > 0.01, "the parameters must move for the comparison to mean anything"
    assert_same_params(grads, ref_grads, 1e-4 * scale)
    metrics = readout_steps["metrics"][1]
    assert abs(float(metrics["loss_bits"]) - float(ref_loss) / math.log(2)) < 1e-5
    assert abs(float(metrics["grad_norm"]) - global_norm(ref_grads)) < 1e-4 * global_norm(ref_grads)


def test_an_update_whose_gradient_norm_exceeds_skip_norm_is_skipped(readout_steps):
    """The author skips updates whose gradient norm exceeds 1000 (here set between two batches'
    norms): the skipped step leaves parameters, optimiser state (the last gradient) and EMA exactly
    as they were, and counts itself; the next, below the threshold, is applied."""
    skip_norm, (high, low), states, metrics = (readout_steps[k] for k in ("skip_norm", "norms", "states", "metrics"))
    assert high > skip_norm > low
    np.testing.assert_allclose([float(m["grad_norm"]) for m in metrics[:2]], [high, low], rtol=1e-4)
    assert [bool(m["ok"]) for m in metrics] == [float(m["grad_norm"]) <= skip_norm for m in metrics]
    assert [bool(m["ok"]) for m in metrics[:2]] == [False, True]
    for name in ("params", "opt_state", "ema"):
        assert_same_params(part(states[1], name), part(states[0], name), 0.0)
    assert global_norm(part(states[2], "opt_state")) > 0.1  # the applied step stored its gradient
    assert [int(s["skipped"]) for s in states] == [0, 1, 1, 1 + (not metrics[2]["ok"])]
    # a skipped update still used its batch: the step count (the data position a resume goes on from) advances
    assert [int(s["step"]) for s in states] == [0, 1, 2, 3]
    assert [int(s["bad_run"]) for s in states[:3]] == [0, 1, 0]


def test_ema_is_decay_times_ema_plus_one_minus_decay_times_the_new_weights(readout_steps):
    """EMA 0.8 by hand from the parameters after each step: e_0 = p_0, e_t = 0.8 e_(t-1) + 0.2 p_t
    for every applied step (a skipped step changes neither)."""
    states, metrics = readout_steps["states"], readout_steps["metrics"]
    ema = part(states[0], "params")
    for state, m in zip(states[1:], metrics):
        if m["ok"]:
            ema = {k: 0.8 * e + 0.2 * part(state, "params")[k] for k, e in ema.items()}
        assert_same_params(part(state, "ema"), ema, 1e-6)
    params = part(states[-1], "params")
    assert max(float(np.abs(ema[k] - params[k]).max()) for k in ema) > 1e-3  # swapping the terms would show


# ---------------------------------------------------------------- 3b. the optimiser, best.npz, --keep


def adamw_by_hand(params, grads, tc, clip):
    """AdamW written out in NumPy (float64): clip the global norm to `clip`, Adam's moments and bias
    correction, decoupled weight decay, lr warming up linearly from 0 over tc.warmup updates."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m, v = ({k: np.zeros_like(x) for k, x in p.items()} for _ in range(2))
    for t, g in enumerate(grads, 1):
        factor = min(1.0, clip / global_norm(g))
        lr = tc.lr * min((t - 1) / tc.warmup, 1.0)
        for k in p:
            gk = g[k].astype(np.float64) * factor
            m[k] = tc.b1 * m[k] + (1 - tc.b1) * gk
            v[k] = tc.b2 * v[k] + (1 - tc.b2) * gk**2
            m_hat, v_hat = m[k] / (1 - tc.b1**t), v[k] / (1 - tc.b2**t)
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + tc.weight_decay * p[k])
    return p


@pytest.mark.parametrize("norms,weight_decay", [((500.0, 50.0, 300.0, 1000.0, 100.0), None),
                                                 ((1e-3, 3e-4, 2e-3, 1e-3, 5e-4), 0.1)])
def test_optimizer_clips_the_global_gradient_norm_at_200_then_applies_adamw(norms, weight_decay):
    """train.make_optimizer with the thesis defaults against AdamW by hand (eps 1e-8), fed gradients
    whose global norm is above and below 200; then tiny gradients (where Adam's eps shows) with
    --weight-decay 0.1."""
    tc = train.TrainConfig(warmup=3)
    assert (tc.clip_norm, tc.skip_norm, tc.lr, tc.b1, tc.b2, tc.weight_decay) == (200.0, 1000.0, 0.002, 0.9, 0.999, 1e-4)
    tc = dataclasses.replace(tc, weight_decay=weight_decay or tc.weight_decay)
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    grads = []
    for norm in norms:
        g = {k: rng.normal(size=x.shape) for k, x in params.items()}
        grads.append({k: (x * norm / global_norm(g)).astype(np.float32) for k, x in g.items()})  # global norm `norm`
    optimizer, _ = train.make_optimizer(tc)
    state, p = optimizer.init(params), params
    for t in range(len(grads)):
        updates, state = optimizer.update(grads[t], state, p)
        p = optax.apply_updates(p, updates)
        assert_same_params({k: np.asarray(x) for k, x in p.items()}, adamw_by_hand(params, grads[: t + 1], tc, 200.0), 1e-6)
    clipped, unclipped = adamw_by_hand(params, grads, tc, 200.0), adamw_by_hand(params, grads, tc, math.inf)
    clipping_shows = max(float(np.abs(clipped[k] - unclipped[k]).max()) for k in params) > 1e-4
    assert clipping_shows == (max(norms) > 200)


def test_two_training_steps_are_adamw_by_hand_on_the_parameters_not_the_ema(data_dir):
    """The compiled train step, twice (AdamW, warmup 1, weight decay 0.5, an EMA started at zero so it
    differs from the weights), against adamw_by_hand over the two batches' jax.grad: the update, its
    decoupled decay included, is computed from the parameters."""
    ds = data.load("sc09-espeak", data_dir, "tiny", seq_len=160)
    batches = [(tokens.astype(np.int32), mask) for tokens, mask in data.batches(ds.train, 8, seed=0)][:2]
    tc = train.TrainConfig(batch_size=8, warmup=1, lr=0.01, weight_decay=0.5, ema=0.5)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state = jax.device_get(jax.jit(lambda: train.init_state(TINY_CFG, tc))())
    state = jax.device_put({**state, "ema": jax.tree.map(np.zeros_like, state["params"])}, NamedSharding(mesh, P()))
    step, start, grads = train.make_train_step(TINY_CFG, tc, mesh), snapshot(state["params"]), []
    for tokens, mask in batches:
        grads.append(snapshot(reference_grad(state["params"], tokens, mask, TINY_CFG)[1]))
        state, _ = step(state, tokens, mask, np.float32(1))
    expected = adamw_by_hand(start, grads, tc, tc.clip_norm)
    assert max(float(np.abs(expected[k] - start[k]).max()) for k in start) > 1e-3  # the second step moved them
    assert_same_params(snapshot(state["params"]), expected, 1e-6)


def test_best_npz_holds_the_ema_of_the_lowest_validation_nll_and_keep_limits_the_checkpoints(
        reference, data_dir, compile_cache, tmp_path):
    """Evaluation stubbed to return validation NLLs 3, 1, 2, 1.5 at steps 2, 4, 6, 8 (test NLLs lowest
    at step 6, not 4) and to save the EMA weights it was given: best.npz holds those of step 4 and
    says so; --keep 2 leaves only the newest two of the checkpoints written every 2 steps. (A
    subprocess, so that the train step comes from the compilation cache the reference run filled.)"""
    out = str(tmp_path / "run")
    prefix = ("import numpy as np, train\n"
              "values, calls = iter([3.0, 3.0, 1.0, 2.0, 2.0, 0.5, 1.5, 2.5]), []  # (validation, test) pairs\n"
              "def make_evaluate(cfg, mesh, dtype='float32'):\n"
              "    def evaluate(params, split, batch_size):\n"
              "        calls.append(1)\n"
              f"        np.savez({out!r} + f'/evaluated_{{len(calls)}}.npz', **train.flatten(params))\n"
              "        return next(values)\n"
              "    return evaluate\n"
              "train.make_evaluate = make_evaluate\n")
    argv = args(data_dir, out, "--eval-every", "2", "--ckpt-every", "2", "--keep", "2")
    argv[argv.index("--steps") + 1] = "8"
    code, log = run(argv, compile_cache, prefix=prefix)
    assert code == 0, log
    assert [r["step"] for r in log_records(out) if "val_nll_bits" in r] == [2, 4, 6, 8]
    meta, arrays = train.read_checkpoint(os.path.join(out, "best.npz"))
    assert (meta["step"], meta["best_val"]) == (4, 1.0)
    evaluated = [dict(np.load(os.path.join(out, f"evaluated_{i}.npz"))) for i in (3, 7)]  # step 4, step 8
    assert_same_params(part(arrays, "ema"), evaluated[0], 0.0)
    assert max(float(np.abs(evaluated[0][k] - evaluated[1][k]).max()) for k in evaluated[0]) > 1e-4
    assert [os.path.basename(p) for p in train.checkpoints(out)] == ["ckpt_00000006.npz", "ckpt_00000008.npz"]


def test_cosine_factor_follows_the_half_cosine_and_constant_stays_one():
    cos, const = train.TrainConfig(decay="cosine"), train.TrainConfig()
    for progress, want in ((0.0, 1.0), (0.25, 0.8535534), (0.5, 0.5), (0.75, 0.1464466), (1.0, 0.0), (1.7, 0.0)):
        assert abs(train.lr_factor(cos, progress) - want) < 1e-6
        assert train.lr_factor(const, progress) == 1.0


# ---------------------------------------------------------------- 3c. what reaches the step: data, dropout, evaluation


def stub_training(monkeypatch, fed, val_nlls=None, factors=None, step_s=0.0):
    """train.make_train_step -> a step that records the rows it is fed (as NumPy) and its lr factor
    (in `factors`, if given), sleeps step_s seconds and only counts;
    train.make_evaluate -> one that returns val_nlls in turn (validation; test gets 9.0)."""
    factors = [] if factors is None else factors

    def make_train_step(cfg, tc, mesh):
        def train_step(state, tokens, mask, lr_scale):
            fed.append(np.asarray(tokens))
            factors.append(float(lr_scale))
            time.sleep(step_s)
            stats = {"loss_bits": np.float32(5.0), "grad_norm": np.float32(1.0), "lr": np.float32(tc.lr),
                     "tokens": np.float32(mask.sum()), "ok": np.bool_(True)}
            return {**state, "step": state["step"] + 1}, stats
        return train_step
    values, calls = iter(val_nlls or []), []

    def make_evaluate(cfg, mesh, dtype="float32"):
        def evaluate(params, split, batch_size):  # run_eval asks for validation, then test
            calls.append(1)
            return next(values) if len(calls) % 2 else 9.0
        return evaluate
    monkeypatch.setattr(train, "make_train_step", make_train_step)
    monkeypatch.setattr(train, "make_evaluate", make_evaluate)


def test_cosine_decay_over_steps_reaches_zero_at_the_last_step(data_dir, tmp_path, monkeypatch):
    """--decay cosine --steps N: step k (1-based) is given the half cosine at (k - 1) / N (the step
    applies it: test_each_step_draws_its_own_dropout_masks_and_lr_scale_...). A run of 5 steps decays over its 5; resumed
    with --steps 12 it goes on along the 12-step curve from step 6; constant (the default) gives 1."""
    factors = []
    stub_training(monkeypatch, [], val_nlls=[5.0] * 4, factors=factors)
    out = str(tmp_path / "cosine")
    assert train.main(args(data_dir, out, "--decay", "cosine", "--steps", "5")) == 0
    assert train.main(args(data_dir, out, "--decay", "cosine", "--resume")) == 0
    want = [0.5 * (1 + math.cos(math.pi * k / n)) for n, ks in ((5, range(5)), (STEPS, range(5, STEPS))) for k in ks]
    assert np.allclose(factors, want, rtol=0, atol=1e-6), factors
    factors.clear()
    assert train.main(args(data_dir, str(tmp_path / "constant"), "--steps", "3")) == 0
    assert factors == [1.0, 1.0, 1.0]


def test_the_step_is_fed_the_training_split_in_each_epochs_seeded_order_across_epochs_and_resume(
        data_dir, tmp_path, monkeypatch):
    """--seed 3, batch 8 (20 steps per epoch) in microbatches of 4: 27 steps, then --resume to 50, cross
    two epoch ends and a mid-epoch resume. The rows fed are exactly data.batches(train, 8, seed 3, epoch e)
    in turn: not the validation split, not epoch 0's order again, not seed 0's, and an epoch is counted
    in batches, not microbatches."""
    ds = data.load("sc09-espeak", data_dir, "tiny", seq_len=160)
    want = [t for e in range(3) for t, _ in data.batches(ds.train, 8, 3, e)][:50]
    fed = []
    stub_training(monkeypatch, fed, val_nlls=[5.0] * 10)
    out = str(tmp_path / "feed")
    assert train.main(args(data_dir, out, "--seed", "3", "--steps", "27", "--microbatch", "4")) == 0
    assert train.main(args(data_dir, out, "--seed", "3", "--steps", "50", "--microbatch", "4", "--resume")) == 0
    assert len(fed) == 50
    for i, (got, expected) in enumerate(zip(fed, want)):
        assert np.array_equal(got, expected), f"step {i + 1}: not the rows of the seeded epoch order"
    assert not np.array_equal(want[20], [t for t, _ in data.batches(ds.train, 8, 3, 0)][0])  # epochs differ


def test_an_epoch_is_the_full_batches_of_the_training_split(data_dir, tmp_path, monkeypatch):
    """--epochs 2 at batch 7, which does not divide the training split: each epoch is its full batches
    (data.batches in each epoch's order); the last partial batch is dropped, not a step of its own."""
    ds = data.load("sc09-espeak", data_dir, "tiny", seq_len=160)
    want = [t for e in range(2) for t, _ in data.batches(ds.train, 7, 0, e)]
    fed = []
    stub_training(monkeypatch, fed, val_nlls=[5.0] * 10)
    argv = args(data_dir, str(tmp_path / "epochs"), "--batch-size", "7", "--epochs", "2", "--eval-every", "1000")
    del argv[argv.index("--steps"):argv.index("--steps") + 2]  # the run's length from --epochs alone
    assert train.main(argv) == 0
    assert len(ds.train) % 7 and len(fed) == len(want) == 2 * (len(ds.train) // 7)
    assert all(np.array_equal(got, expected) for got, expected in zip(fed, want))


def test_best_npz_keeps_its_score_across_a_resume(data_dir, tmp_path, monkeypatch):
    """Validation NLL 1.0 at step 1, 2.0 at step 2; resumed, 3.0 at step 3: best.npz stays step 1's."""
    stub_training(monkeypatch, [], val_nlls=[1.0, 2.0, 3.0])
    out = str(tmp_path / "best")
    assert train.main(args(data_dir, out, "--steps", "2", "--eval-every", "1")) == 0
    assert train.main(args(data_dir, out, "--steps", "3", "--eval-every", "1", "--resume")) == 0
    meta, _ = train.read_checkpoint(os.path.join(out, "best.npz"))
    assert (meta["step"], meta["best_val"]) == (1, 1.0)
    assert [r["val_nll_bits"] for r in log_records(out) if "val_nll_bits" in r] == [1.0, 2.0, 3.0]


def test_a_new_run_into_a_folder_holding_a_run_is_refused_so_two_runs_never_mix(data_dir, tmp_path, monkeypatch):
    """Without --resume, an --out that holds checkpoints (or only best.npz) is refused before anything is
    written: a second run there would append to the first's log.jsonl, and the rotation would keep
    whichever run's checkpoints sort last. --resume continues it."""
    stub_training(monkeypatch, [], val_nlls=[1.0, 2.0, 3.0])
    out = str(tmp_path / "taken")
    assert train.main(args(data_dir, out, "--steps", "2", "--eval-every", "1")) == 0
    files, records = sorted(os.listdir(out)), log_records(out)
    refused = re.escape(f"error: {out} already holds a run's checkpoints: continue it with --resume")
    with pytest.raises(SystemExit, match=refused):
        train.main(args(data_dir, out, "--steps", "3"))
    assert sorted(os.listdir(out)) == files and log_records(out) == records
    assert train.main(args(data_dir, out, "--steps", "3", "--eval-every", "1", "--resume")) == 0
    assert [r["step"] for r in log_records(out) if "val_nll_bits" in r] == [1, 2, 3]
    for path in train.checkpoints(out):  # best.npz alone is a run too: sample.py reads it
        os.remove(path)
    with pytest.raises(SystemExit, match=refused):
        train.main(args(data_dir, out, "--steps", "4", "--warm-start", os.path.join(out, "best.npz")))


def test_a_run_gives_the_signal_handlers_it_found_back_when_it_ends(data_dir, tmp_path, monkeypatch):
    """train.main catches Ctrl-C and SIGTERM only while it runs: a caller's own handlers (a notebook's,
    a job runner's) are theirs again afterwards, not the defaults, which would kill on a later signal."""
    stub_training(monkeypatch, [], val_nlls=[1.0])
    theirs = {s: (lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
    before = {s: signal.signal(s, h) for s, h in theirs.items()}
    try:
        assert train.main(args(data_dir, str(tmp_path / "run"), "--steps", "1", "--eval-every", "1")) == 0
        assert {s: signal.getsignal(s) for s in theirs} == theirs
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_curves_png_is_redrawn_at_every_evaluation_so_a_long_run_can_be_watched(data_dir, tmp_path, monkeypatch):
    """--steps 3 --eval-every 1: OUT/curves.png is drawn after each evaluation with the validation NLLs so
    far (1, 2, then 3 of them), and once more at the end with every training step's loss."""
    stub_training(monkeypatch, [], val_nlls=[3.0, 2.0, 1.0])
    drawn = []

    def save_figure(fig, path):
        lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[-1].get_lines()}
        drawn.append((path, lines.get("validation NLL (EMA)"), len(lines["training loss (batch)"])))
    monkeypatch.setattr(train.metrics, "save_figure", save_figure)
    out = str(tmp_path / "watched")
    assert train.main(args(data_dir, out, "--steps", "3", "--eval-every", "1")) == 0
    curves = os.path.join(out, "curves.png")
    assert drawn == [(curves, [3.0], 1), (curves, [3.0, 2.0], 2), (curves, [3.0, 2.0, 1.0], 3),
                     (curves, [3.0, 2.0, 1.0], 3)]


def test_log_records_what_was_measured_on_which_split_and_minutes_run_on_across_a_resume(
        data_dir, tmp_path, monkeypatch, capsys):
    """With the step and the evaluation stubbed: each evaluation logs validation's NLL as val_nll_bits and
    the test split's as test_nll_bits (each split's own fingerprint); ms_per_step is the mean time per
    step since the first (compiling) one, in milliseconds, so at least the stub step's 50 ms sleep;
    tokens_per_s is the batch's real tokens over the step's time; a resumed run's minutes go on from the
    checkpoint's. The header's unigram entropy is the training split's real tokens' entropy in bits.
    Every other training row is padded after 100 tokens (at 160 tokens the built-in clips have none):
    padding counts neither in the entropy nor in the logged tokens."""
    full = data.load("sc09-espeak", data_dir, "tiny", seq_len=160)
    lengths = np.where(np.arange(len(full.train)) % 2, 100, full.train.lengths).astype(np.int32)
    padded = np.where(np.arange(160) < lengths[:, None], full.train.tokens, data.SILENCE).astype(np.uint8)
    ds = dataclasses.replace(full, train=data.Split(padded, lengths, full.train.labels))
    monkeypatch.setattr(data, "load", lambda *a, **k: ds)
    fingerprint = lambda split: float(split.tokens[:2, :40].sum())

    def make_evaluate(cfg, mesh, dtype="float32"):
        return lambda params, split, batch_size: fingerprint(split)
    stub_training(monkeypatch, [], step_s=0.05)
    monkeypatch.setattr(train, "make_evaluate", make_evaluate)
    out = str(tmp_path / "logged")
    assert train.main(args(data_dir, out, "--steps", "4", "--eval-every", "2")) == 0
    first = log_records(out)
    timed = [r["ms_per_step"] for r in first if "ms_per_step" in r and r["step"] > 1]  # step 1 compiles: timed apart
    assert len(timed) == 3 and all(50 <= ms < 10_000 for ms in timed), timed  # each stub step sleeps 50 ms
    counts = np.bincount(ds.train.tokens[np.arange(ds.seq_len) < ds.train.lengths[:, None]], minlength=256)
    p = counts[counts > 0] / counts.sum()
    printed = float(re.search(r"unigram entropy ([0-9.]+) bits", capsys.readouterr().out).group(1))
    assert abs(printed + np.sum(p * np.log2(p))) < 0.006  # printed to 2 decimals; in nats it would be 0.69x
    assert train.main(args(data_dir, out, "--steps", "6", "--eval-every", "2", "--resume")) == 0
    records = log_records(out)
    evals = [r for r in records if "val_nll_bits" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["val_nll_bits"] == fingerprint(ds.validation) and r["test_nll_bits"] == fingerprint(ds.test)
               for r in evals) and fingerprint(ds.validation) != fingerprint(ds.test)
    real = [int(mask.sum()) for _, mask in data.batches(ds.train, 8, 0)][:6]
    for logged, tokens in zip(logged_tokens(out), real):
        assert abs(logged - tokens) < 1e-6 * tokens
    resumed = records[len(first):]
    assert min(r["minutes"] for r in resumed) >= max(r["minutes"] for r in first) > 0


def test_a_resumed_runs_minutes_budget_is_its_own_whatever_the_runs_before_it_took(data_dir, tmp_path, monkeypatch):
    """--minutes bounds this run's wall clock (a lent GPU's leg), while the log's minutes count every run's:
    resumed from a checkpoint said (by a patched load_latest) to record 10,000 minutes, --minutes 1 still
    trains its steps to --steps."""
    stub_training(monkeypatch, [], val_nlls=[5.0] * 4)
    out = str(tmp_path / "long")
    assert train.main(args(data_dir, out, "--steps", "3")) == 0
    real = train.load_latest

    def after_a_week(*a):
        state, meta = real(*a)
        return state, {**meta, "minutes": 10_000.0}
    monkeypatch.setattr(train, "load_latest", after_a_week)
    assert train.main(args(data_dir, out, "--steps", "6", "--minutes", "1", "--resume")) == 0
    resumed = [r for r in log_records(out) if "loss_bits" in r][3:]
    assert [r["step"] for r in resumed] == [4, 5, 6] and all(r["minutes"] >= 10_000 for r in resumed)
    assert train.read_checkpoint(train.checkpoints(out)[-1])[0]["step"] == 6


def test_a_skipped_update_is_logged_when_it_happens(data_dir, tmp_path, monkeypatch):
    """--log-every 5 over 4 steps, the update of step 2 skipped: step 2 is logged at once (with its skip
    counted), then the last step."""
    def make_train_step(cfg, tc, mesh):
        def train_step(state, tokens, mask, lr_scale):
            bad = int(state["step"]) == 1
            stats = {"loss_bits": np.float32(np.nan if bad else 5.0), "grad_norm": np.float32(1.0),
                     "lr": np.float32(tc.lr), "tokens": np.float32(mask.sum()), "ok": np.bool_(not bad)}
            return {**state, "step": state["step"] + 1, "bad_run": np.int32(bad),
                    "skipped": state["skipped"] + int(bad)}, stats
        return train_step
    stub_training(monkeypatch, [], val_nlls=[5.0])
    monkeypatch.setattr(train, "make_train_step", make_train_step)
    out = str(tmp_path / "skip")
    assert train.main(args(data_dir, out, "--steps", "4", "--log-every", "5")) == 0
    assert [(r["step"], r["skipped"]) for r in log_records(out) if "loss_bits" in r] == [(2, 1), (4, 1)]


def test_the_end_of_run_report_samples_with_the_runs_seed_and_dtype(data_dir, tmp_path, monkeypatch):
    """A bf16 run's report samples and scores in bf16, and so do its evaluations, whose validation NLL
    picks best.npz: the NLL a run logs and the one its report prints are computed alike."""
    stub_training(monkeypatch, [], val_nlls=[5.0])
    calls, evaluations, stub = [], [], train.make_evaluate
    monkeypatch.setattr(train.sample, "quality_report", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(train, "make_evaluate",
                        lambda cfg, mesh, dtype="float32": evaluations.append(dtype) or stub(cfg, mesh))
    out = str(tmp_path / "report")
    assert train.main(args(data_dir, out, "--steps", "1", "--seed", "3", "--report-samples", "5",
                           "--dtype", "bfloat16")) == 0
    assert calls == [((out, 5), {"dtype": "bfloat16", "seed": 3})]
    assert evaluations == ["bfloat16"]


def test_warm_start_continues_from_ema_weights_in_parts_with_a_fresh_optimiser(data_dir, tmp_path, monkeypatch):
    """Leg 1: 3 (stubbed) steps. Its EMA weights travel split in parts; leg 2 (--warm-start, another seed
    so its own init differs) starts from them: its parameters and EMA are leg 1's EMA, its AdamW state
    fresh (step count 0: the warmup again), its step count, data position and minutes go on, and the log
    marks where it begins."""
    stub_training(monkeypatch, [], val_nlls=[5.0] * 8)
    leg1, leg2 = str(tmp_path / "leg1"), str(tmp_path / "leg2")
    assert train.main(args(data_dir, leg1, "--steps", "3")) == 0
    cfg, ema, meta = train.load_model(leg1)
    parts = checkpoint.save_parts(str(tmp_path / "ema"), {"ema": ema}, meta, max_bytes=20_000)
    assert len(parts) > 1
    assert train.main(args(data_dir, leg2, "--steps", "5", "--seed", "5", "--warm-start", *parts)) == 0
    meta2, arrays = train.read_checkpoint(train.checkpoints(leg2)[-1])
    assert meta2["step"] == 5 and meta2["leg"] == 2
    flat = train.flatten(ema)
    for k, v in flat.items():  # the stubbed steps leave the weights where the warm start put them
        np.testing.assert_array_equal(arrays[f"params/{k}"], v)
        np.testing.assert_array_equal(arrays[f"ema/{k}"], v)
    counts = [v for k, v in arrays.items() if k.startswith("opt_state/") and k.endswith("count")]
    assert counts and all(int(c) == 0 for c in counts)  # fresh AdamW: its schedule's warmup starts again
    records = log_records(leg2)
    assert records[0] == {"step": 3, "minutes": records[0]["minutes"], "leg": 2, "warm_start": parts}
    assert records[0]["minutes"] >= meta["minutes"] > 0
    assert [r["step"] for r in records if "loss_bits" in r] == [4, 5]
    # a rerun of the leg (.ci/full_size.py passes --resume and --warm-start) goes on from its own checkpoint
    assert train.main(args(data_dir, leg2, "--steps", "6", "--resume", "--warm-start", *parts)) == 0
    records = log_records(leg2)
    assert [r["step"] for r in records if "loss_bits" in r] == [4, 5, 6]
    assert [r["step"] for r in records if "warm_start" in r] == [3]
    # weights of another model config are refused by name
    with pytest.raises(SystemExit, match="d_model: checkpoint 16 vs requested 32"):
        train.main(args(data_dir, str(tmp_path / "leg3"), "--d-model", "32", "--warm-start", *parts))
    # a whole checkpoint (best.npz: params/ beside ema/) gives its EMA weights, not its raw parameters
    whole, leg4 = str(tmp_path / "whole.npz"), str(tmp_path / "leg4")
    checkpoint.save_checkpoint(whole, {"params": jax.tree.map(lambda v: v + 1, ema), "ema": ema}, meta)
    assert train.main(args(data_dir, leg4, "--steps", "4", "--warm-start", whole)) == 0
    _, arrays = train.read_checkpoint(train.checkpoints(leg4)[-1])
    for k, v in flat.items():
        np.testing.assert_array_equal(arrays[f"params/{k}"], v)


def full_size_script():
    spec = importlib.util.spec_from_file_location("full_size", os.path.join(HERE, ".ci", "full_size.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_full_size_leg_runs_end_to_end_at_tiny_size_and_packs_what_comes_back(data_dir, tmp_path):
    """.ci/full_size.py --tiny: trains, samples, scores, and packs at most 8 files under 16 MiB: the log,
    config, quality row, curves, spectrograms, the WAVs, and EMA weights that load as the run's model."""
    out, run_dir = tmp_path / "out", tmp_path / "run"
    proc = subprocess.run([sys.executable, ".ci/full_size.py", "--tiny", "--minutes", "0.05", "--out", str(out),
                           "--run", str(run_dir), "--data-dir", data_dir, "--warm", str(tmp_path / "none")],
                          cwd=HERE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert files == ["config.json", "curves.png", "ema-1of1.npz", "log.jsonl", "metrics.json", "samples.tar",
                     "spectrograms.png"]
    with open(out / "metrics.json") as f:
        row = json.load(f)
    assert {"nll", "fid", "is", "mis", "am", "voiced", "floor_drift_db"} <= set(row) and row["n"] == 4
    with tarfile.open(out / "samples.tar") as tar:
        assert sorted(tar.getnames()) == ["samples/metrics.json", "samples/sample_000.wav", "samples/sample_001.wav",
                                          "samples/sample_002.wav", "samples/sample_003.wav", "samples/samples.json"]
    meta, arrays = checkpoint.read_parts([str(out / "ema-1of1.npz")])
    cfg, ema, _ = checkpoint.load_model(str(run_dir))
    assert meta["model"]["pooling"] == [2, 4] and set(arrays) == {f"ema/{k}" for k in checkpoint.flatten(ema)}
    for k, v in checkpoint.flatten(ema).items():
        np.testing.assert_array_equal(arrays[f"ema/{k}"], v)


def test_a_full_size_leg_packs_the_newest_checkpoints_ema_and_the_baselines_fits_in_two_parts(tmp_path):
    """What a leg brings back for the next: the EMA of the run's newest checkpoint (where the next leg goes
    on), not an older one's and not the raw parameters; and the baseline's 7.27M float32 weights (29 MB)
    split in two files, each under the 16 MiB a lent machine returns, 8 files in all."""
    module = full_size_script()
    run_dir, out = tmp_path / "run", tmp_path / "out"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "samples" / "sample_000.wav").write_bytes(b"RIFF")
    for step in (10, 20):
        state = {"params": {"w": np.full(3, -step, np.float32)}, "ema": {"w": np.full(3, step, np.float32)}}
        checkpoint.save_checkpoint(str(run_dir / f"ckpt_{step:08d}.npz"), state, {"step": step})
    paths = module.pack(str(run_dir), str(out))
    meta, arrays = checkpoint.read_parts(paths)
    assert meta == {"step": 20} and set(arrays) == {"ema/w"} and arrays["ema/w"].tolist() == [20, 20, 20]
    sizes = module.ema_sizes()  # pf.Config(): the thesis baseline
    assert round(sum(sizes) / 4 / 1e6, 2) == 7.27  # the thesis' 7.27M parameters, 4 bytes each
    parts = module.weight_parts(sizes)
    assert len(parts) == 2 and sorted(i for part in parts for i in part) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in part) < 16 * 2**20 for part in parts)


def test_the_next_full_size_leg_installs_the_carried_wheels_and_warm_starts_from_its_parts(tmp_path, monkeypatch):
    module = full_size_script()
    wheel = "espeakng_loader-0.2.4-py3-none-any.whl"
    for folder, names in ((".full", ("ema-2of2.npz", "ema-1of2.npz")), (".whl", (wheel,))):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(b"")
    commands = []
    monkeypatch.setattr(module, "ROOT", str(tmp_path))
    monkeypatch.setattr(module, "run", lambda command, env: commands.append((command, env)))
    monkeypatch.setattr(module, "pack", lambda run_dir, out: None)
    monkeypatch.setattr(module, "ema_sizes", lambda *flags: [10**6] * 28)  # the baseline's ~28 MB: 2 parts
    assert module.main(["--out", str(tmp_path / "o"), "--minutes", "5", "--warmup", "250"]) == 0
    (pip, _), (command, env) = commands  # the wheels first (a lent machine has no package registry), then train.py
    site = pip[pip.index("--target") + 1]
    assert pip[1:4] == ["-m", "pip", "install"] and "--no-index" in pip
    assert pip[-1] == str(tmp_path / ".whl" / wheel)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == site
    parts = [str(tmp_path / ".full" / f"ema-{i}of2.npz") for i in (1, 2)]
    assert command[command.index("--warm-start") + 1:][:2] == parts
    for flag, value in (("--preset", "sc09"), ("--dtype", "bfloat16"), ("--minutes", "5.0"), ("--dataset", "sc09-espeak"),
                        ("--warmup", "250")):  # a leg's shortened warmup (the thesis': 1000) reaches train.py
        assert command[command.index(flag) + 1] == value
    assert "--resume" in command and "--tiny" not in command and "--d-model" not in command


def test_a_full_size_leg_stops_at_a_command_that_fails():
    """A failed pip install or train.py leg ends the script with its error: the leg packs no stale files
    from an earlier run as if they were this one's."""
    with pytest.raises(subprocess.CalledProcessError) as e:
        full_size_script().run([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    assert e.value.returncode == 3


def test_a_training_step_with_the_fused_scan_kernel_equals_one_with_the_associative_scan(data_dir, monkeypatch):
    """One compiled step (dropout on, AdamW) from the same state and batch, pf.SCAN = fused (the Pallas
    kernel, interpreted here) against associative: the same loss, gradient norm and new parameters."""
    ds = data.load("sc09-espeak", data_dir, "tiny", seq_len=160)
    tokens, mask = next(iter(data.batches(ds.train, 8, seed=0)))
    cfg = pf.Config(pooling=(), layers=(1,), d_model=16, d_rnn=64, dropout=0.1)  # one RG-LRU: one kernel's compile
    tc = train.TrainConfig(batch_size=8, warmup=1, lr=0.01)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    host = jax.device_get(jax.jit(lambda: train.init_state(cfg, tc))())
    results = {}
    for name in ("associative", "fused"):
        monkeypatch.setattr(pf, "SCAN", name)
        step = train.make_train_step(cfg, tc, mesh)
        state, _ = step(jax.device_put(host, NamedSharding(mesh, P())), tokens.astype(np.int32), mask, np.float32(1))
        new, m = step(state, tokens.astype(np.int32), mask, np.float32(1))  # after the warmup's lr-0 step
        results[name] = (float(m["loss_bits"]), float(m["grad_norm"]), snapshot(new["params"]))
    (loss_a, norm_a, params_a), (loss_f, norm_f, params_f) = results["associative"], results["fused"]
    assert abs(loss_a - loss_f) < 1e-5 and abs(norm_a - norm_f) < 1e-4 * norm_a
    assert_same_params(params_f, params_a, 1e-6)
    assert max(float(np.abs(v - host_v).max()) for v, host_v in zip(params_a.values(), snapshot(host["params"]).values())) > 1e-3


def test_each_step_draws_its_own_dropout_masks_and_lr_scale_scales_the_adamw_update(data_dir):
    """One compiled step (dropout 0.5, AdamW with weight decay 0.1). Dropout: from the same weights,
    step 0 twice gives the same loss, step 1 another, and both differ from the loss without dropout,
    so a dropout key reaches the loss, one per step. lr_scale: after a warmup step, one update from
    the same state with scale 1 and 0.5 (the same masks): the parameters move exactly half as far
    (the decay term included); with 0 they do not move."""
    ds = data.load("sc09-espeak", data_dir, "tiny", seq_len=160)
    tokens, mask = next(iter(data.batches(ds.train, 8, seed=0)))
    tokens = tokens.astype(np.int32)
    cfg = dataclasses.replace(TINY_CFG, dropout=0.5)
    tc = train.TrainConfig(batch_size=8, warmup=1, lr=0.01, weight_decay=0.1)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    step = train.make_train_step(cfg, tc, mesh)
    host = jax.device_get(jax.jit(lambda: train.init_state(cfg, tc))())  # init compiled once
    # new buffers (the step donates them), placed as the step's output is: one compile of the step
    fresh = lambda **changes: jax.device_put({**host, **changes}, NamedSharding(mesh, P()))
    losses = [float(step(fresh(step=np.int32(at)), tokens, mask, np.float32(1))[1]["loss_bits"])
              for at in (0, 0, 1)]
    plain = float(reference_grad(fresh()["params"], tokens, mask, TINY_CFG)[0]) / math.log(2)
    assert losses[0] == losses[1]
    assert min(abs(losses[0] - losses[2]), abs(losses[0] - plain), abs(losses[2] - plain)) > 1e-4, (losses, plain)
    moved = {}
    _, m = step(fresh(step=np.int32(7)), tokens, mask, np.float32(1.0))  # a warm start: step 7, AdamW's count 0
    assert float(m["lr"]) == 0.0  # the schedule follows AdamW's own count, so it logs the warmup's lr
    for scale in (1.0, 0.5, 0.0):
        state, m = step(fresh(), tokens, mask, np.float32(1.0))  # step 0: lr 0 in the warmup
        assert float(m["lr"]) == 0.0  # the logged lr is the one this update used, not the next step's
        before = snapshot(state["params"])
        state, m = step(state, tokens, mask, np.float32(scale))
        assert abs(float(m["lr"]) - 0.01 * scale) < 1e-9
        moved[scale] = {k: v - before[k] for k, v in snapshot(state["params"]).items()}
    assert max(float(np.abs(v).max()) for v in moved[1.0].values()) > 1e-3
    assert_same_params(moved[0.5], {k: v / 2 for k, v in moved[1.0].items()}, 1e-6)  # float32 rounding of p
    assert_same_params(moved[0.0], {k: 0 * v for k, v in moved[1.0].items()}, 0.0)


def test_each_microbatch_draws_its_own_dropout_masks_from_the_steps_key():
    """Dropout 0.5, 2 microbatches of 2, and a batch whose two microbatches hold the same rows (microbatch i
    takes rows i, i + 2): the step's loss is the two microbatches' NLL sums, each under its own key
    fold_in(fold_in(key(seed + 1), step), i), over the token count (pf.nll_sum, outside the step). One key
    shared by both would give the first microbatch's loss alone."""
    cfg = dataclasses.replace(TINY_CFG, dropout=0.5)
    tc = train.TrainConfig(batch_size=4, microbatch=2, seed=3)
    rows = np.random.default_rng(0).integers(0, 256, (2, 160)).astype(np.int32)
    tokens, mask = rows[[0, 0, 1, 1]], np.ones((4, 160), np.float32)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state = jax.device_put(jax.jit(lambda: train.init_state(cfg, tc))(), NamedSharding(mesh, P()))
    params = jax.tree.map(np.array, state["params"])
    loss = float(train.make_train_step(cfg, tc, mesh)(state, tokens, mask, np.float32(1))[1]["loss_bits"])
    step_key = jax.random.fold_in(jax.random.key(4), 0)
    nll = jax.jit(lambda i: pf.nll_sum(params, rows, np.ones((2, 160)), cfg, jax.random.fold_in(step_key, i))[0])
    each = [float(nll(i)) / (2 * 160) / math.log(2) for i in (0, 1)]
    assert abs(each[0] - each[1]) > 1e-3  # two draws of the masks: two losses
    assert loss == pytest.approx((each[0] + each[1]) / 2, abs=1e-5)


def test_input_noise_moves_a_share_of_the_inputs_and_the_loss_keeps_the_clean_targets(data_dir):
    """corrupt_inputs: p of the tokens move, each by 1..8 levels up or down, clipped to 0..255.
    The step with --input-noise 0.3: its loss is the NLL of the clean tokens given the inputs
    corrupt_inputs draws from the step's key (pf.apply, NumPy log-softmax), not that of the clean
    inputs; with 0 it is the clean NLL. The step is fed uint8 tokens, as data.batches yields them."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 4000)), jnp.int32)
    moved = np.asarray(train.corrupt_inputs(tokens, jax.random.key(3), 0.3, 256)) - np.asarray(tokens)
    assert 0.29 < np.mean(moved != 0) < 0.31 and np.abs(moved).max() == 8  # (a token at 0 or 255 can stay)
    assert abs(np.mean(moved > 0) - np.mean(moved < 0)) < 0.01
    as_bytes = train.corrupt_inputs(tokens.astype(jnp.uint8), jax.random.key(3), 0.3, 256)  # no wrap below 0
    assert np.array_equal(np.asarray(as_bytes), np.asarray(tokens) + moved)
    edge = np.asarray(train.corrupt_inputs(jnp.full((1, 4000), 255), jax.random.key(3), 1.0, 256))
    assert edge.min() == 247 and edge.max() == 255 and 0.45 < np.mean(edge == 255) < 0.55  # the upward half
    ds = data.load("sc09-espeak", data_dir, "tiny", seq_len=160)
    tokens, mask = next(iter(data.batches(ds.train, 8, seed=0)))
    assert tokens.dtype == np.uint8
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))

    def nll_bits(params, inputs):
        logits = np.asarray(jax.jit(pf.apply, static_argnums=2)(params, jnp.asarray(inputs, jnp.int32), TINY_CFG), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        return -np.sum(np.take_along_axis(logp, tokens[..., None], -1)[..., 0] * mask) / mask.sum() / math.log(2)

    losses = {}
    for p in (0.0, 0.3):
        tc = train.TrainConfig(batch_size=8, warmup=1, seed=5, input_noise=p)
        state = jax.device_put(jax.jit(lambda: train.init_state(TINY_CFG, tc))(), NamedSharding(mesh, P()))
        params = jax.tree.map(jnp.copy, state["params"])
        losses[p] = float(train.make_train_step(TINY_CFG, tc, mesh)(state, tokens, mask, np.float32(1))[1]["loss_bits"])
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(6), 0), 1)  # seed+1, step 0, n_micro + microbatch 0
    noisy = np.asarray(train.corrupt_inputs(jnp.asarray(tokens, jnp.int32), key, 0.3, 256))
    assert np.mean(noisy != tokens) > 0.2
    assert losses[0.0] == pytest.approx(nll_bits(params, tokens), abs=1e-4)
    assert losses[0.3] == pytest.approx(nll_bits(params, noisy), abs=1e-4)
    assert abs(losses[0.3] - losses[0.0]) > 1e-3


def test_evaluation_is_the_mean_nll_of_real_tokens_without_dropout():
    """train.make_evaluate (dropout 0.5 in the config) on 11 rows of mixed lengths in batches of 4 (the
    last batch padded): bits per real token, against log-softmax in NumPy over pf.apply's logits, in
    float32 and in bfloat16 (--dtype bfloat16 evaluates as it trains)."""
    cfg = dataclasses.replace(TINY_CFG, dropout=0.5)
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 65, 11)
    split = data.Split(rng.integers(0, 256, (11, 64)).astype(np.uint8), lengths, np.zeros(11, np.int64))
    params = pf.init(jax.random.key(0), cfg)
    real = np.arange(64) < lengths[:, None]
    for dtype in ("float32", "bfloat16"):
        got = train.make_evaluate(cfg, Mesh(np.array(jax.devices()[:1]), ("data",)), dtype)(params, split, 4)
        logits = np.asarray(pf.apply(params, split.tokens.astype(np.int32), cfg, dtype=pf.DTYPES[dtype]), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, split.tokens[..., None].astype(np.int64), -1)[..., 0]
        assert abs(got - nll[real].mean() / math.log(2)) < 2e-5, dtype  # bf16 moves it by ~2e-4
        assert abs(got - nll.mean() / math.log(2)) > 1e-3  # the padding would show


def test_the_default_run_is_the_documented_cpu_recipe():
    """`python train.py` with no flags: the sc09-espeak preset's values, pinned as literals."""
    cfg, tc = train.parse_args([])
    assert (cfg.pooling, cfg.layers, cfg.d_model, cfg.d_rnn, cfg.dropout) == ((4, 4, 5), (0, 1, 1, 2), 32, 64, 0.0)
    assert (tc.dataset, tc.out, tc.batch_size, tc.lr, tc.decay, tc.warmup, tc.ema, tc.minutes) == \
        ("sc09-espeak", "runs/digits", 4, 0.005, "constant", 50, 0.98, 8.0)
    assert (tc.eval_every, tc.eval_clips, tc.report_samples, tc.dtype) == (250, 64, 64, "float32")


# Thesis sec. 4.7 (Table 4.6): the music models' pooling, layers and recurrence width, written out here
# (the width D is not stated there: the baseline's 128).
MUSIC = {"beethoven": ((2, 4, 4, 5), (8, 4, 4, 4, 4), 512), "youtubemix": ((2, 2, 4, 4), (8, 4, 4, 4, 4), 512)}


@pytest.mark.parametrize("dataset", sorted(MUSIC))
def test_the_music_presets_are_the_thesis_models_and_preset_brings_them_to_another_dataset(dataset):
    """--dataset beethoven / youtubemix: the thesis' model for it. --preset NAME takes NAME's model onto
    another dataset (here the built-in digits); a flag still overrides the preset."""
    for argv in (["--dataset", dataset], ["--preset", dataset]):
        cfg, tc = train.parse_args(argv)
        assert (cfg.pooling, cfg.layers, cfg.d_rnn, cfg.d_model) == (*MUSIC[dataset], 128), argv
    cfg, tc = train.parse_args(["--preset", dataset, "--d-rnn", "64"])
    assert (tc.dataset, cfg.layers, cfg.d_rnn) == ("sc09-espeak", MUSIC[dataset][1], 64)


# ---------------------------------------------------------------- 4. crash safety


def wait_for_step(proc, out, step, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        try:
            if any(r.get("step", 0) >= step and "loss_bits" in r for r in log_records(out)):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {out}")


def test_sigkill_mid_training_then_resume_ends_like_an_uninterrupted_run(reference, data_dir, compile_cache, tmp_path):
    out = str(tmp_path / "killed")
    proc = run(args(data_dir, out), compile_cache, wait=False)
    wait_for_step(proc, out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(train.checkpoints(out)) and final_params(out)[0]["step"] < STEPS
    code, log = run(args(data_dir, out, "--resume"), compile_cache)
    assert code == 0 and "resumed from step" in log, log
    assert final_params(out)[0]["step"] == STEPS
    assert_same_params(final_params(out)[1], final_params(reference)[1], 1e-6)


def test_sigkill_mid_checkpoint_write_then_resume_ends_like_an_uninterrupted_run(reference, data_dir, compile_cache, tmp_path):
    out = str(tmp_path / "killed-in-write")
    # The second checkpoint write dies half-way through its temporary file, as a power cut would.
    prefix = ("import os, signal, train\n"
              "calls = []\n"
              "real = train.np.savez\n"
              "def dying_savez(f, **arrays):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2:\n"
              "        real(f, **dict(list(arrays.items())[: len(arrays) // 2])); f.flush()\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    real(f, **arrays)\n"
              "train.np.savez = dying_savez\n")
    code, log = run(args(data_dir, out), compile_cache, prefix=prefix)
    assert code == -signal.SIGKILL, log
    assert any(f.endswith(".tmp") for f in os.listdir(out)), os.listdir(out)
    code, log = run(args(data_dir, out, "--resume"), compile_cache)
    assert code == 0 and "resumed from step 3" in log, log
    assert_same_params(final_params(out)[1], final_params(reference)[1], 1e-6)


def test_a_corrupt_checkpoint_is_reported_and_the_previous_one_used(reference, data_dir, compile_cache, tmp_path):
    out = str(tmp_path / "corrupt")
    os.makedirs(out)
    for name in os.listdir(reference):  # a copy of the finished run, newest checkpoint truncated
        with open(os.path.join(reference, name), "rb") as src, open(os.path.join(out, name), "wb") as dst:
            dst.write(src.read())
    newest = train.checkpoints(out)[-1]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    code, log = run(args(data_dir, out, "--resume"), compile_cache)
    assert code == 0, log
    assert f"checkpoint {newest} is unreadable" in log and f"resumed from step {STEPS - 3}" in log, log
    assert_same_params(final_params(out)[1], final_params(reference)[1], 1e-6)


def interrupt(data_dir, compile_cache, out, signum):
    """A 1000-step run sent signum once it has logged step 2: it saves and exits 130. -> (argv, saved step).
    Every checkpoint write is printed. No periodic checkpoint (--ckpt-every 1000) but each epoch's end
    (20 steps): the signal's save writes the last step's checkpoint, a second time if it ends an epoch."""
    argv = args(data_dir, out)
    argv[argv.index("--steps") + 1] = "1000"
    argv[argv.index("--ckpt-every") + 1] = "1000"
    prefix = ("import os, train\n"
              "real = train.save_checkpoint\n"
              "def save_checkpoint(path, *a, **k):\n"
              "    print('wrote', os.path.basename(path), flush=True)\n"
              "    return real(path, *a, **k)\n"
              "train.save_checkpoint = save_checkpoint\n")
    proc = run(argv, compile_cache, wait=False, prefix=prefix)
    wait_for_step(proc, out, 2)
    proc.send_signal(signum)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "continue with --resume" in log, log
    saved = final_params(out)[0]["step"]
    # it stopped at the signal: not after its 1000 steps (then saving and exiting 130 would look the same)
    assert 2 <= saved < 1000 and saved == max(r["step"] for r in log_records(out) if "loss_bits" in r)
    assert log.count(f"wrote ckpt_{saved:08d}.npz") == 1 + (saved % 20 == 0), log
    return argv, saved


def test_sigint_saves_and_exits_cleanly(data_dir, compile_cache, tmp_path):
    interrupt(data_dir, compile_cache, str(tmp_path / "interrupted"), signal.SIGINT)


def test_sigterm_saves_exits_130_and_resume_continues_from_the_saved_step(data_dir, compile_cache, tmp_path):
    out = str(tmp_path / "terminated")
    argv, saved = interrupt(data_dir, compile_cache, out, signal.SIGTERM)
    argv[argv.index("--steps") + 1] = str(saved + 2)
    code, log = run([*argv, "--resume"], compile_cache)
    assert code == 0 and f"resumed from step {saved}" in log, log
    assert final_params(out)[0]["step"] == saved + 2
    assert [r["step"] for r in log_records(out) if "loss_bits" in r][-2:] == [saved + 1, saved + 2]


# ---------------------------------------------------------------- 5. config mismatch, NaN


def test_resuming_with_another_model_config_is_refused_naming_the_fields(reference, data_dir, compile_cache):
    argv = args(data_dir, reference, "--resume", "--d-model", "32", "--no-gated")
    code, log = run(argv, compile_cache)
    assert code != 0
    assert "d_model: checkpoint 16 vs requested 32" in log and "gated: checkpoint True vs requested False" in log, log
    # another validation split (--train-clips) would make the checkpoint's best score meaningless
    with pytest.raises(SystemExit, match="trained with --train-clips None, not 2: resume with the same value"):
        train.main(args(data_dir, reference, "--resume", "--train-clips", "2"))


def test_nan_losses_skip_updates_then_stop_with_the_last_good_state(data_dir, tmp_path, monkeypatch):
    real = train.nll_sum
    monkeypatch.setattr(train, "nll_sum", lambda *a, **k: (jnp.nan * real(*a, **k)[0], real(*a, **k)[1]))
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit, match="3 updates in a row skipped"):
        train.main(args(data_dir, out, "--max-bad-steps", "3"))
    meta, arrays = train.read_checkpoint(train.checkpoints(out)[-1])
    cfg, tc = train.parse_args(args(data_dir, out))
    fresh = train.flatten(jax.jit(lambda: train.init_state(cfg, tc))()["params"])  # as train.py initialises
    assert_same_params({k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")},
                       {k: np.asarray(v) for k, v in fresh.items()}, 0.0)
    assert [r["skipped"] for r in log_records(out) if "loss_bits" in r] == [1, 2, 3]


def test_minutes_budget_stops_on_time_and_leaves_a_complete_run(data_dir, compile_cache, tmp_path):
    """--minutes 0.3 with a step count it could never reach: the loop stops at the budget, then the
    run finishes as one that reached its steps (evaluation, best.npz, final checkpoint), having kept
    a snapshot every --snapshot-minutes 0.1 on the way; with
    --decay cosine the learning rate anneals over the 18 s, not over the million steps."""
    out = str(tmp_path / "budget")
    start = time.perf_counter()
    code, log = run(args(data_dir, out, "--steps", "1000000", "--minutes", "0.3", "--log-every", "1",
                         "--decay", "cosine", "--snapshot-minutes", "0.1"), compile_cache)
    wall = time.perf_counter() - start
    assert code == 0, log
    meta, _ = final_params(out)
    assert 1 <= meta["step"] < 1000000 and f"budget is spent at step {meta['step']}" in log
    records = log_records(out)
    assert records[-1]["step"] == meta["step"] and "val_nll_bits" in records[-1]  # evaluated at the last step
    assert os.path.exists(os.path.join(out, "best.npz"))
    snapshots = [train.read_checkpoint(os.path.join(out, f"at_{m}min.npz"))[0] for m in ("0.1", "0.2")]
    assert 1 <= snapshots[0]["step"] < snapshots[1]["step"] <= meta["step"]
    assert 0.1 <= snapshots[0]["minutes"] < 0.2 <= snapshots[1]["minutes"] < 0.3 + 0.05  # all-runs clock
    etas = [r["eta_min"] for r in records if "eta_min" in r]
    assert etas and max(etas) <= 0.3  # the ETA follows the budget, not the million steps
    assert wall < 18 + 90, f"{wall:.0f} s for an 18 s budget"  # startup, data and the final evaluation aside
    # --decay cosine follows the clock: lr = the preset's 0.005 times the half cosine of the budget's elapsed part
    # (the log's minutes are read just after the step's own clock reading, and count from the start)
    decayed = [(r["minutes"] / 0.3, r["lr"] / 0.005) for r in records if "lr" in r and r["step"] > 5]
    assert len(decayed) > 10 and decayed[-1][1] < 0.1
    assert all(abs(f - 0.5 * (1 + math.cos(math.pi * min(p, 1)))) < 0.08 for p, f in decayed), decayed


@pytest.mark.parametrize("minutes", ["0", "-1"])
def test_minutes_budget_must_be_positive(minutes, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--minutes", minutes])
    assert e.value.code == 2 and f"--minutes {float(minutes)} must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--snapshot-minutes", minutes])
    assert e.value.code == 2 and f"--snapshot-minutes {float(minutes)} must be > 0" in capsys.readouterr().err


# TrainConfig's counts, written out here (not read from train.POSITIVE): each must be >= 1 where set.
COUNTS = ("batch_size", "microbatch", "epochs", "warmup", "log_every", "ckpt_every", "keep", "eval_every",
          "eval_clips", "max_bad_steps", "train_clips")
REFUSED = [*({f: 0} for f in COUNTS), {"steps": -1}, {"lr": 0.0}, {"b1": 1.0}, {"b2": 1.0}, {"ema": 1.0},
           {"ema": -0.1}, {"weight_decay": -1e-4}, {"input_noise": 1.01}, {"input_noise": -0.01}]
ACCEPTED = [*({f: 1} for f in COUNTS), {"steps": 0}, {"b1": 0.0}, {"b2": 0.0}, {"ema": 0.0}, {"ema": 0.9999},
            {"weight_decay": 0.0}, {"input_noise": 0.0}, {"input_noise": 1.0}]
change_id = lambda change: "{}={}".format(*next(iter(change.items())))  # {"ema": 1.0} -> ema=1.0


@pytest.mark.parametrize("change", REFUSED, ids=change_id)
def test_a_value_just_outside_its_range_is_refused_naming_the_flag(change):
    """check_config at each range's edge, one step outside: --microbatch 0 would otherwise run without
    accumulation (0 reads as 'the whole batch'), --ema 1 would keep the initial weights for ever."""
    (field, _), = change.items()
    with pytest.raises(SystemExit) as e:
        train.check_config(pf.Config(), train.TrainConfig(**change))
    assert str(e.value).startswith("error:") and f"--{field.replace('_', '-')}" in str(e.value), str(e.value)


@pytest.mark.parametrize("change", ACCEPTED, ids=change_id)
def test_a_value_at_the_edge_of_its_range_is_accepted(change):
    train.check_config(pf.Config(), train.TrainConfig(**change))


def test_the_pooling_is_checked_against_the_requested_length_before_any_data_is_built():
    """--seq-len, where given, is the length the pooling must divide, not the dataset's own (16,000 here,
    which 2*4 divides): 30 is refused in one line naming it, 32 accepted."""
    cfg = pf.Config(pooling=(2, 4), layers=(1, 1, 1))
    with pytest.raises(SystemExit, match="error: .*30.*2\\*4 = 8.*set --seq-len or --pooling"):
        train.check_config(cfg, train.TrainConfig(seq_len=30))
    train.check_config(cfg, train.TrainConfig(seq_len=32))
    train.check_config(cfg, train.TrainConfig())  # the dataset's 16,000


def test_unigram_entropy_counts_each_rows_real_tokens_only():
    """Rows of 6 tokens with 6, 2 and 0 real ones (the rest padding, 128): the entropy of 0, 0, 1, 2, 3, 3, 4, 4
    in bits, by hand; a padding token counted would add a 128."""
    tokens = np.array([[0, 0, 1, 2, 3, 3], [4, 4, 128, 128, 128, 128], [128] * 6], np.uint8)
    split = data.Split(tokens, np.array([6, 2, 0], np.int32), np.full(3, -1))
    assert train.unigram_entropy(split) == pytest.approx(-(3 * 0.25 * math.log2(0.25) + 2 * 0.125 * math.log2(0.125)))


def test_train_clips_trains_and_validates_on_the_first_clip_of_each_digit_in_turn():
    labels = np.array([2, 0, 0, 1, 2, 0, -1])
    assert train.memorisation_rows(labels, 7).tolist() == [6, 1, 3, 0, 2, 4, 5]
    assert train.memorisation_rows(np.full(5, -1), 3).tolist() == [0, 1, 2]
    # 300 clips a label, as the built-in digits have 320: ranks past 255 keep their order
    assert train.memorisation_rows(np.tile([0, 1, 2], 300), 900).tolist() == list(range(900))
    tokens = np.arange(7)[:, None] * np.ones((1, 4), np.uint8)
    split = data.Split(tokens, np.arange(1, 8, dtype=np.int32), labels)
    ds = data.Dataset("sc09-espeak", "mu-law", 16000, 4, split, split, split)
    mem = train.memorisation_set(ds, 3)  # the clips 6, 1 and 3
    assert mem.validation.tokens[:, 0].tolist() == [6, 1, 3] and mem.validation.lengths.tolist() == [7, 2, 4]
    assert mem.train.tokens[:, 0].tolist() == [6, 1, 3, 6, 1, 3, 6]  # repeated to the split's length
    assert mem.train.labels.tolist() == [-1, 0, 1, -1, 0, 1, -1] and mem.test is split
    with pytest.raises(SystemExit, match="--train-clips 8: the training split has 7 clips"):
        train.memorisation_set(ds, 8)
    with pytest.raises(SystemExit, match="--train-clips 0 must be >= 1"):
        train.check_config(pf.Config(), train.TrainConfig(train_clips=0))


def test_a_train_clips_run_resumes_with_the_same_value_only(data_dir, tmp_path, monkeypatch):
    """--train-clips validates on its own clips, so a resume must keep the value its checkpoint records
    (under "train" in its meta): the same value goes on, another (or none) is refused naming both."""
    stub_training(monkeypatch, [], val_nlls=[5.0] * 4)
    out = str(tmp_path / "memorise")
    assert train.main(args(data_dir, out, "--steps", "2", "--train-clips", "2")) == 0
    assert train.main(args(data_dir, out, "--steps", "3", "--train-clips", "2", "--resume")) == 0
    assert train.checkpoints(out)[-1].endswith("ckpt_00000003.npz")
    with pytest.raises(SystemExit, match="trained with --train-clips 2, not None: resume with the same value"):
        train.main(args(data_dir, out, "--steps", "4", "--resume"))


def test_the_batch_must_split_into_microbatches_and_each_microbatch_over_the_devices():
    """Each microbatch is sharded over the devices, so its rows, not only the batch's, must divide among
    them; the error names all three numbers."""
    split = data.Split(np.zeros((16, 4), np.uint8), np.full(16, 4, np.int32), np.zeros(16, np.int32))
    ds = data.Dataset("sc09-espeak", "mu-law", 16000, 4, split, split, split)
    cfg = pf.Config(pooling=(), layers=(1,))
    for batch, micro, devices in ((8, 4, 4), (8, None, 8), (6, 3, 3), (8, 2, 1)):
        train.check(cfg, train.TrainConfig(batch_size=batch, microbatch=micro), ds, devices)  # accepted
    for batch, micro, devices in ((8, 2, 4), (6, 4, 2), (8, None, 3), (4, 1, 2)):
        words = f"batch size {batch} must be a multiple of the microbatch {micro or batch}, itself a multiple of " \
                f"the {devices} devices"
        with pytest.raises(SystemExit, match=words):
            train.check(cfg, train.TrainConfig(batch_size=batch, microbatch=micro), ds, devices)

def test_run_ends_with_a_quality_report_equal_to_metrics_evaluate(data_dir, compile_cache, tmp_path):
    """A run on the built-in digits ends by sampling (here 4 clips), scoring them with the shipped
    classifier and drawing curves.png; `metrics.py evaluate`, run afterwards in its own process on the
    same WAVs and checkpoint, gives the same numbers."""
    out = str(tmp_path / "report")
    code, log = run(args(data_dir, out, "--report-samples", "4"), compile_cache)
    assert code == 0, log
    assert "sc09-espeak test clips (n=400)" in log and os.path.exists(os.path.join(out, "curves.png"))
    wavs = sorted(f for f in os.listdir(os.path.join(out, "samples")) if f.endswith(".wav"))
    assert wavs == [f"sample_{i:03d}.wav" for i in range(4)]
    with open(os.path.join(out, "samples", "metrics.json")) as f:
        report = json.load(f)
    again = str(tmp_path / "again.json")
    proc = subprocess.run([sys.executable, "metrics.py", "evaluate", "--samples", os.path.join(out, "samples"),
                           "--checkpoint", out, "--data-dir", data_dir, "--out", again],
                          cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(again) as f:
        evaluated = json.load(f)
    for key in ("nll", "fid", "is", "mis", "am"):
        assert evaluated[key] == pytest.approx(report[key], rel=1e-6), key
    assert evaluated["floor_drift_db"] == report["floor_drift_db"] and evaluated["voiced"] == report["voiced"]
    assert 0.0 < report["nll"] < 9.0 and report["classifier"].endswith(os.path.join("classifiers", "sc09-espeak"))


def test_shipped_classifier_recognises_the_built_in_digits(data_dir):
    """classifiers/sc09-espeak (made by `python metrics.py train-classifier --dataset sc09-espeak`, seed 0;
    97.5% on the 400 clips of the default test split) must still recognise the built-in digits: at least
    95% of the tiny set's 40 validation and test clips (other speakers than it was trained on)."""
    import metrics
    folder = metrics.find_classifier("sc09-espeak", "no/such/data/dir")
    assert folder == os.path.join(HERE, "classifiers", "sc09-espeak")
    params, config, _ = metrics.load_classifier(folder)
    assert config["test_accuracy"] >= 0.95
    ds = data.load("sc09-espeak", data_dir, "tiny")
    right = total = 0
    for split in (ds.validation, ds.test):
        right += metrics.accuracy(params, metrics.mel_features(metrics._split_audio(split, ds.encoding)),
                                  split.labels) * len(split)
        total += len(split)
    assert right / total >= 0.95, f"{right:.0f} of {total} clips recognised"


def test_a_warm_started_leg_trains_its_real_steps(data_dir, tmp_path):
    """The warm start's real step, not a stubbed one: the step donates the whole state, so its parameters
    and EMA must be two sets of buffers (one set, donated twice, was refused: "Attempt to donate the same
    buffer twice", on one device and on two). Leg 2 trains on from leg 1's EMA weights: finite losses, parameters moved from where they began."""
    leg1, leg2 = str(tmp_path / "leg1"), str(tmp_path / "leg2")
    assert train.main(args(data_dir, leg1, "--steps", "2", "--eval-every", "2")) == 0
    assert train.main(args(data_dir, leg2, "--steps", "4", "--eval-every", "4",
                           "--warm-start", os.path.join(leg1, "best.npz"))) == 0
    losses = [r["loss_bits"] for r in log_records(leg2) if "loss_bits" in r]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    _, start = train.read_checkpoint(os.path.join(leg1, "best.npz"))
    _, end = train.read_checkpoint(train.checkpoints(leg2)[-1])
    moved = [k for k in end if k.startswith("params/") and not np.array_equal(end[k], start["ema/" + k[7:]])]
    assert moved
