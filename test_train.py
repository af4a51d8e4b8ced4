"""train.py: learning, multi-device and multi-process equivalence, accumulation, crash safety,
config mismatch and NaN handling, on a tiny model and the tiny built-in dataset."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import data
import pf
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = ["--pooling", "2", "--layers", "1", "1", "--d-model", "16", "--d-rnn", "64", "--dropout", "0.1"]
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
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= tol, f"largest parameter difference {worst:.3g} > {tol}"


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


# ---------------------------------------------------------------- 2-3. devices, processes, accumulation


def test_eight_devices_take_the_same_steps_as_one(reference, data_dir, compile_cache, tmp_path):
    out = str(tmp_path / "eight")
    code, log = run(args(data_dir, out), compile_cache, devices=8)
    assert code == 0 and "8 devices" in log, log
    ref_losses = [r["loss_bits"] for r in log_records(reference) if "loss_bits" in r]
    losses = [r["loss_bits"] for r in log_records(out) if "loss_bits" in r]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
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
    assert_same_params(final_params(str(tmp_path / "multi"))[1], final_params(reference)[1], 1e-5)


def test_four_microbatches_of_two_give_the_update_of_one_batch_of_eight(data_dir):
    cfg = pf.Config(pooling=(2,), layers=(1, 1), d_model=16, d_rnn=64, dropout=0.0)  # no dropout: same masks
    ds = data.load("sc09-espeak", data_dir, "tiny", seq_len=160)
    tokens, mask = next(data.batches(ds.train, 8, seed=0))
    mask[3, 100:] = False  # uneven token counts per microbatch: the mean must still be over the batch
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    results = []
    for micro in (None, 2):
        tc = train.TrainConfig(batch_size=8, microbatch=micro, warmup=1)
        state = jax.jit(lambda: train.init_state(cfg, tc))()
        state, metrics = train.make_train_step(cfg, tc, mesh)(state, tokens, mask)
        results.append((float(metrics["loss_bits"]), train.flatten(state["params"])))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    assert_same_params(results[0][1], results[1][1], 1e-6)


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


def test_sigint_saves_and_exits_cleanly(data_dir, compile_cache, tmp_path):
    out = str(tmp_path / "interrupted")
    argv = args(data_dir, out)
    argv[argv.index("--steps") + 1] = "1000"
    proc = run(argv, compile_cache, wait=False)
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "continue with --resume" in log, log
    meta = final_params(out)[0]
    assert meta["step"] >= 2 and meta["step"] == max(r["step"] for r in log_records(out) if "loss_bits" in r)


# ---------------------------------------------------------------- 5. config mismatch, NaN


def test_resuming_with_another_model_config_is_refused_naming_the_fields(reference, data_dir, compile_cache):
    argv = args(data_dir, reference, "--resume", "--d-model", "32", "--no-gated")
    code, log = run(argv, compile_cache)
    assert code != 0
    assert "d_model: checkpoint 16 vs requested 32" in log and "gated: checkpoint True vs requested False" in log, log


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
    run finishes as one that reached its steps (evaluation, best.npz, final checkpoint)."""
    out = str(tmp_path / "budget")
    start = time.perf_counter()
    code, log = run(args(data_dir, out, "--steps", "1000000", "--minutes", "0.3", "--log-every", "1"), compile_cache)
    wall = time.perf_counter() - start
    assert code == 0, log
    meta, _ = final_params(out)
    assert 1 <= meta["step"] < 1000000 and f"budget is spent at step {meta['step']}" in log
    records = log_records(out)
    assert records[-1]["step"] == meta["step"] and "val_nll_bits" in records[-1]  # evaluated at the last step
    assert os.path.exists(os.path.join(out, "best.npz"))
    etas = [r["eta_min"] for r in records if "eta_min" in r]
    assert etas and max(etas) <= 0.3  # the ETA follows the budget, not the million steps
    assert wall < 18 + 90, f"{wall:.0f} s for an 18 s budget"  # startup, data and the final evaluation aside


@pytest.mark.parametrize("minutes", ["0", "-1"])
def test_minutes_budget_must_be_positive(minutes, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--minutes", minutes])
    assert e.value.code == 2 and f"--minutes {float(minutes)} must be > 0" in capsys.readouterr().err


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
