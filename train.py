"""Train a Poolformer with the thesis recipe (sec. 4.2-4.3) on one device or many.

    python train.py                                  # the built-in digits, a CPU-sized model (~10 min)
    python train.py --dataset sc09 --out runs/sc09   # the thesis baseline (TPU/GPU scale)
    python train.py --dataset sc09 --out runs/sc09 --resume

config -> mesh -> data -> init or resume -> jitted train_step -> evaluate -> loop. One
jax.sharding.Mesh over all devices (all processes, after jax.distributed.initialize when launched
multi-host) with one axis, 'data': the batch is sharded, parameters and optimiser state replicated.
Checkpoints are .npz files of plain arrays keyed by tree path (no pickle), written atomically.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from einops import rearrange
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import data
import metrics
import pf
import sample
from checkpoint import (checkpoints, config_mismatch, first_readable, flatten, load_model,  # noqa: F401
                        read_checkpoint, read_parts, restore, save_checkpoint)
from pf import DTYPES, nll_sum  # noqa: F401 (train.nll_sum is the loss train_step differentiates)


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "sc09-espeak"  # preset and data: sc09 | sc09-espeak | beethoven | youtubemix | bytes
    preset: str | None = None  # another dataset's model and recipe, e.g. sc09 (the thesis') on the built-in digits
    out: str = "runs/digits"  # checkpoints, config.json and log.jsonl go here
    data_dir: str = "data"  # datasets, their .npy cache and the digit classifier live here
    size: str = "default"  # sc09-espeak: tiny | default | a clip count
    path: str | None = None  # bytes: the file; other datasets: their folder
    seq_len: int | None = None  # None = the dataset's own length
    batch_size: int = 32  # global batch (all devices, all microbatches)
    microbatch: int | None = None  # rows per gradient-accumulation microbatch; None = the whole batch
    epochs: int = 500  # passes over the training split
    steps: int | None = None  # stop after this many steps instead (overrides epochs)
    minutes: float | None = None  # wall-clock budget of this run, compile included; then it finishes as at its last step
    lr: float = 0.002  # AdamW learning rate, after a linear warmup
    decay: str = "constant"  # after the warmup: constant (the thesis) | cosine (to 0 over the run's --minutes or steps)
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.999  # AdamW beta2
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    warmup: int = 1000  # steps of linear learning-rate warmup from 0
    ema: float = 0.999  # EMA of the weights, used for evaluation and sampling
    clip_norm: float = 200.0  # clip the global gradient norm (the author's value)
    skip_norm: float = 1000.0  # skip an update whose gradient norm exceeds this (the author's value)
    max_bad_steps: int = 20  # this many skipped updates in a row stop the run
    seed: int = 0  # parameter init, data order and dropout
    log_every: int = 10  # steps between log lines
    ckpt_every: int = 500  # steps; a checkpoint is also written at every epoch end
    keep: int = 3  # last checkpoints kept (plus best.npz)
    snapshot_minutes: float | None = None  # also keep OUT/at_<M>min.npz every M minutes of this run (quality curves)
    eval_every: int | None = None  # steps; evaluation also runs at every epoch end and at the end
    eval_clips: int | None = None  # evaluate on the first N clips of each split (None = all)
    train_clips: int | None = None  # a memorisation check: train and validate on N clips (the first of each digit in turn)
    resume: bool = False  # continue from the newest readable checkpoint in --out
    warm_start: tuple[str, ...] = ()  # .npz files holding another run's ema/ weights (split or whole): start from them, fresh AdamW (warmup again)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (mixed precision: see pf.py's docstring)
    input_noise: float = 0.0  # not in the thesis: the share of input tokens moved by 1-8 levels (the targets stay clean)
    report_samples: int = 64  # spoken digits: clips sampled and scored (NLL, FID, IS, mIS, AM) at the end; 0: none


PRESETS = {  # per dataset: (model changes, train changes); explicit flags override them
    "sc09": ({}, {"out": "runs/sc09"}),
    "beethoven": ({"pooling": (2, 4, 4, 5), "layers": (8, 4, 4, 4, 4), "d_rnn": 512}, {"out": "runs/beethoven"}),
    "youtubemix": ({"pooling": (2, 2, 4, 4), "layers": (8, 4, 4, 4, 4), "d_rnn": 512}, {"out": "runs/youtubemix"}),
    # CPU-sized, the README's main job: 8 minutes of training on 2 cores, then the quality report; under 10
    # minutes in all with the dataset's build (docs/experiments.md: what 28 minutes and 2 hours buy).
    # No layers at the full 16 kHz rate: one there costs 3.7x per step, more than its better loss per step
    # buys at equal minutes; the first pooling is by 4. lr 0.005 beat 0.002 and matched 0.01 at 10 minutes.
    "sc09-espeak": ({"pooling": (4, 4, 5), "layers": (0, 1, 1, 2), "d_model": 32, "d_rnn": 64, "dropout": 0.0},
                    {"out": "runs/digits", "batch_size": 4, "minutes": 8.0, "lr": 0.005, "warmup": 50,
                     "log_every": 10, "ckpt_every": 200, "eval_every": 250, "eval_clips": 64,
                     "ema": 0.98}),  # 0.999 would average ~1000 steps
    "bytes": ({"pooling": (2, 4, 4, 5), "layers": (2, 2, 2, 2, 2)}, {"out": "runs/bytes", "seq_len": 4000}),
}


# ---------------------------------------------------------------- optimiser, train step (the loss: pf.nll_sum)


def make_optimizer(tc):
    schedule = optax.join_schedules([optax.linear_schedule(0.0, tc.lr, tc.warmup), optax.constant_schedule(tc.lr)],
                                    [tc.warmup])
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                       optax.adamw(schedule, tc.b1, tc.b2, weight_decay=tc.weight_decay)), schedule


DECAYS = ("constant", "cosine")


def lr_factor(tc, progress):
    """The learning rate's multiplier after the warmup, at `progress` in [0, 1] of the run: the
    thesis keeps it constant; `cosine` (not the thesis') anneals it to 0 by the end of the run's
    budget. Tried on the CPU recipe, it did not help (README, Results: d1)."""
    if tc.decay == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def init_state(cfg, tc):
    params = pf.init(jax.random.key(tc.seed), cfg)
    return {"params": params, "opt_state": make_optimizer(tc)[0].init(params), "ema": params,
            "step": jnp.zeros((), jnp.int32), "bad_run": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32)}


def compiler_options():
    """XLA:CPU in jax 0.10 hands reductions to YNNPACK, which sums the (S, 1, D) -> D bias gradients
    of a batch-1 step ~10x slower than XLA's own loops (jax-ml/jax#37465; the workaround named there is
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce; same compiled HLO). Keep YNNPACK for
    the matmuls only: ~8% off the baseline's step at 16,000 samples (alternating runs of the step with
    and without). Other backends: no options."""
    if jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def corrupt_inputs(tokens, key, p, vocab, width=8):
    """--input-noise p (an experiment, not in the thesis): each token the model reads is, with
    probability p, moved by 1 to `width` levels up or down (clipped to the vocabulary); the targets
    stay clean, so the logged training loss is the NLL given noisy inputs. Trained on clean inputs
    only, the model never sees an input like its own sampling errors, and a sample that leaves the
    data does not come back (README: Results)."""
    k_hit, k_size, k_sign = jax.random.split(key, 3)
    tokens = tokens.astype(jnp.int32)  # the step gets uint8 tokens, in which a sign of 2 * 0 - 1 wraps to 255
    size = jax.random.randint(k_size, tokens.shape, 1, width + 1)
    sign = 2 * jax.random.bernoulli(k_sign, 0.5, tokens.shape).astype(jnp.int32) - 1
    moved = jnp.clip(tokens + size * sign, 0, vocab - 1)
    return jnp.where(jax.random.bernoulli(k_hit, p, tokens.shape), moved, tokens)


def count_of(opt_state, default):
    """AdamW's own update count: the step its learning-rate schedule is at (after a warm start it begins
    at 0 again, and a skipped update does not advance it); default for an optimiser that keeps none."""
    return next((leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                 if getattr(path[-1], "name", None) == "count"), default)


def make_train_step(cfg, tc, mesh):
    """train_step(state, tokens (B, L), mask (B, L), lr_scale) -> (state, metrics): lr_scale (a host
    float32, from lr_factor()) scales the update, i.e. the learning rate. The batch is split into
    B / microbatch microbatches whose gradients are summed before one update, so the update equals
    the full batch's (its dropout masks aside: each microbatch draws its own): the loss is the mean over
    all unmasked tokens of the batch."""
    optimizer, schedule = make_optimizer(tc)
    n_micro = tc.batch_size // (tc.microbatch or tc.batch_size)
    grad_fn = jax.value_and_grad(nll_sum, has_aux=True)
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def train_step(state, tokens, mask, lr_scale):
        key = jax.random.fold_in(jax.random.key(tc.seed + 1), state["step"])
        # microbatch i takes rows i, i + n_micro, ...: every microbatch stays spread over all devices
        micro = NamedSharding(mesh, P(None, "data"))
        tokens = jax.lax.with_sharding_constraint(rearrange(tokens, "(m n) l -> n m l", n=n_micro), micro)
        mask = jax.lax.with_sharding_constraint(rearrange(mask, "(m n) l -> n m l", n=n_micro), micro)

        def accumulate(carry, i):
            noise_key = jax.random.fold_in(key, n_micro + i)  # apart from every dropout key (pf splits fold_in(key, i))
            inputs = corrupt_inputs(tokens[i], noise_key, tc.input_noise, cfg.vocab) if tc.input_noise else None
            (total, count), grads = grad_fn(state["params"], tokens[i], mask[i], cfg, jax.random.fold_in(key, i),
                                            tc.dtype, inputs)
            return jax.tree.map(jnp.add, carry, (total, count, grads)), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
        (total, count, grads), _ = jax.lax.scan(accumulate, zeros, jnp.arange(n_micro))
        count = jnp.maximum(count, 1.0)
        loss, grads = total / count, jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        opt_state_before = state["opt_state"]  # its count is the step the schedule gives this update
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        updates = jax.tree.map(lambda u: lr_scale * u, updates)  # AdamW's update (decay included) is linear in lr
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: tc.ema * e + (1 - tc.ema) * p, state["ema"], params)
        # A NaN/inf loss or an exploding gradient skips the update (the author skips norms > 1000).
        ok = jnp.isfinite(loss) & (grad_norm <= tc.skip_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        state = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
                 "ema": keep(ema, state["ema"]), "step": state["step"] + 1,
                 "bad_run": jnp.where(ok, 0, state["bad_run"] + 1), "skipped": state["skipped"] + (~ok)}
        metrics = {"loss_bits": loss / math.log(2), "grad_norm": grad_norm, "lr": schedule(count_of(opt_state_before, state["step"] - 1)) * lr_scale,
                   "tokens": count, "ok": ok}
        return state, metrics

    return jax.jit(train_step, in_shardings=(replicated, rows, rows, replicated), out_shardings=(replicated, replicated),
                   donate_argnums=0, compiler_options=compiler_options())


def make_evaluate(cfg, mesh, dtype="float32"):
    rows = NamedSharding(mesh, P("data"))
    nll = jax.jit(lambda params, tokens, mask: nll_sum(params, tokens, mask, cfg, dtype=dtype),
                  in_shardings=(NamedSharding(mesh, P()), rows, rows), compiler_options=compiler_options())

    def evaluate(params, split, batch_size):
        """NLL in bits per sample over the unmasked tokens of a split (no dropout)."""
        return metrics.split_nll_bits(lambda tokens, mask: nll(params, tokens, mask), split, batch_size,
                                      lambda rows_: global_batch(rows_, rows))

    return evaluate


# ---------------------------------------------------------------- devices and data


def make_mesh():
    """One 'data' axis over every device of every process. Multi-host: launched with the usual JAX
    distributed environment (JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID),
    jax.distributed.initialize() joins the processes first."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    return Mesh(np.array(jax.devices()), ("data",))


def global_batch(local_rows, sharding):
    """This process' rows of the global batch -> one global array sharded over the mesh."""
    n = jax.process_count()
    per_process = local_rows.shape[0] // n
    mine = local_rows[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
    return jax.make_array_from_process_local_data(sharding, mine, local_rows.shape)


def train_batches(split, tc, start_step):
    """(step, epoch, tokens, mask) from start_step on, crossing epochs; every process reads the same
    global batch and global_batch() keeps its share."""
    per_epoch = data.steps_per_epoch(split, tc.batch_size)
    epoch, step_in_epoch = divmod(start_step, per_epoch)
    step = start_step
    while True:
        for tokens, mask in data.batches(split, tc.batch_size, tc.seed, epoch, step_in_epoch):
            yield step, epoch, tokens, mask
            step += 1
        epoch, step_in_epoch = epoch + 1, 0


def subset(split, n):
    return split if n is None else split.take(slice(n))


def unigram_entropy(split):
    """Bits per token of the split's real tokens (padding left out): the NLL of a model that ignores the context."""
    real = np.arange(split.tokens.shape[1]) < split.lengths[:, None]
    p = np.bincount(split.tokens[real], minlength=256) / real.sum()
    return float(-np.sum(p[p > 0] * np.log2(p[p > 0])))


def memorisation_rows(labels, n):
    """The first clip of each label in label order, then the second of each, ...: n training rows.
    On the built-in digits n = 10 gives one clip per digit; unlabelled data (-1) gives rows 0..n-1."""
    rank = np.zeros(len(labels), np.int64)  # how many earlier rows share the row's label
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rank[rows] = np.arange(len(rows))
    return np.lexsort((labels, rank))[:n]


def memorisation_set(ds, n):
    """--train-clips N: can the model learn N clips by heart? They become the validation split (so
    best.npz is the best-memorised state) and the training split, repeated to the split's former
    length so an epoch keeps its number of steps. The test split stays: it measures the overfitting."""
    if not 1 <= n <= len(ds.train):
        raise SystemExit(f"error: --train-clips {n}: the training split has {len(ds.train)} clips")
    rows = memorisation_rows(ds.train.labels, n)
    return dataclasses.replace(ds, validation=ds.train.take(rows), train=ds.train.take(np.resize(rows, len(ds.train))))


# ---------------------------------------------------------------- checkpoints (checkpoint.py)


def load_latest(out, cfg, template):
    """The newest readable checkpoint: (state, meta). One from another model config is refused,
    naming the differing fields."""
    found = first_readable(reversed(checkpoints(out)))
    if found is None:
        return None, None
    path, meta, arrays = found
    diff = config_mismatch(meta["model"], cfg)
    if diff:
        raise SystemExit(f"error: {path} was trained with another model config; differing fields:\n  "
                         + "\n  ".join(diff))
    return restore(template, arrays, path), meta


def warm_start(paths, cfg, tc, template):
    """--warm-start: a new leg from another run's EMA weights (in one .npz or split over several, as a lent
    machine brings them back): they become the parameters and the EMA; the AdamW state is fresh, so its
    warmup runs again (the parameters and its two moments: three more copies of the weights to carry). The
    step count, the data order and the
    wall-clock minutes go on from the weights' record. -> (state, meta)."""
    try:
        meta, arrays = read_parts(paths)
        diff = config_mismatch(meta["model"], cfg)
        if diff:
            raise ValueError("trained with another model config; differing fields:\n  " + "\n  ".join(diff))
        ema = restore(template["ema"], {k[len("ema/"):]: v for k, v in arrays.items() if k.startswith("ema/")},
                      " ".join(paths))
    except Exception as e:  # noqa: BLE001 -- unreadable, truncated, another config or pf.py: one error line
        raise SystemExit(f"error: --warm-start {' '.join(paths)}: {type(e).__name__}: {e}")
    state = jax.jit(lambda: init_state(cfg, tc))()
    # Two sets of buffers: the train step donates the whole state, and one set donated twice is refused.
    state = {**state, "params": jax.tree.map(jnp.copy, ema), "ema": ema, "step": jnp.asarray(meta["step"], jnp.int32)}
    return state, {"best_val": None, "minutes": meta.get("minutes", 0.0), "leg": meta.get("leg", 1) + 1,
                   "warm_start": list(paths)}


# ---------------------------------------------------------------- the loop


@contextlib.contextmanager
def interruptible():
    """Ctrl-C / SIGTERM set a flag, so the loop finishes its step, saves and exits."""
    stop = {"signal": None}
    handler = lambda signum, frame: stop.update(signal=signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def parse_args(argv):
    first = data.Parser(add_help=False)
    first.add_argument("--dataset", default=TrainConfig.dataset, choices=sorted(PRESETS))
    first.add_argument("--preset", default=None, choices=sorted(PRESETS))
    known = first.parse_known_args(argv)[0]
    model_preset, train_preset = PRESETS[known.preset or known.dataset]
    parser = data.Parser(description=__doc__)
    comments = pf.field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), train_preset.get(f.name, getattr(TrainConfig, f.name))
        kw = {"default": default, "help": pf.flag_help(comments.get(f.name), default)}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, tuple):
            parser.add_argument(flag, nargs="+", **kw)
        else:
            kind = {"int | None": int, "float | None": float, "str | None": str}.get(str(f.type), type(default))
            parser.add_argument(flag, type=kind, choices=sorted(PRESETS) if f.name in ("dataset", "preset") else None,
                                **kw)
    pf.add_config_args(parser, dataclasses.replace(pf.Config(), **model_preset))
    args = parser.parse_args(argv)
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    tc = dataclasses.replace(tc, warm_start=tuple(tc.warm_start))
    if tc.decay not in DECAYS:
        parser.error(f"--decay {tc.decay!r} is not one of {', '.join(DECAYS)}")
    if tc.dtype not in DTYPES:
        parser.error(f"--dtype {tc.dtype!r} is not one of {', '.join(DTYPES)}")
    for name in ("minutes", "snapshot_minutes"):
        if getattr(tc, name) is not None and not getattr(tc, name) > 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(tc, name)} must be > 0 (minutes of wall clock)")
    try:
        return pf.config_from_args(args), tc
    except ValueError as e:
        raise SystemExit(f"error: {e}")


POSITIVE = ("batch_size", "microbatch", "epochs", "warmup", "log_every", "ckpt_every", "keep", "eval_every",
            "eval_clips", "max_bad_steps", "train_clips", "seq_len")  # TrainConfig fields that must be >= 1 where set


def check_config(cfg, tc):
    """Refuse a config that cannot run, before any data is built: one line naming the value."""
    for name in POSITIVE:
        value = getattr(tc, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} {value} must be >= 1")
    if tc.steps is not None and tc.steps < 0:
        raise SystemExit(f"error: --steps {tc.steps} must be >= 0")
    if not (tc.lr > 0 and 0 <= tc.b1 < 1 and 0 <= tc.b2 < 1 and 0 <= tc.ema < 1 and tc.weight_decay >= 0):
        raise SystemExit(f"error: need --lr > 0 (got {tc.lr}), --b1, --b2 and --ema in [0, 1) (got {tc.b1}, "
                         f"{tc.b2}, {tc.ema}) and --weight-decay >= 0 (got {tc.weight_decay})")
    if not 0 <= tc.input_noise <= 1:
        raise SystemExit(f"error: --input-noise {tc.input_noise} must be in [0, 1] (a share of the input tokens)")
    seq_len = tc.seq_len or data.SEQ_LEN[tc.dataset]
    try:
        cfg.check_length(seq_len)
    except ValueError as e:
        raise SystemExit(f"error: {e}; set --seq-len or --pooling so that it divides")


def check(cfg, tc, ds, n_devices):
    cfg.check_length(ds.seq_len)
    micro = tc.microbatch or tc.batch_size
    if tc.batch_size % micro or micro % n_devices:
        raise SystemExit(f"error: batch size {tc.batch_size} must be a multiple of the microbatch {micro}, "
                         f"itself a multiple of the {n_devices} devices")
    if data.steps_per_epoch(ds.train, tc.batch_size) == 0:
        raise SystemExit(f"error: the training split has {len(ds.train)} rows, fewer than one batch of {tc.batch_size}")


def format_config(resolved, width=100):
    """The resolved config in a few lines (config.json keeps it in full): one group per part,
    'name value' pairs separated by |, lists written 2,4,4,5, lines broken between pairs."""
    lines = []
    for part, fields in resolved.items():
        line = f"{part}:"
        for k, v in fields.items():
            pair = f"{k} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
            if len(line) + len(pair) + 3 > width:
                lines.append(line)
                line = "  " + pair
            else:
                line += (" " if line.endswith(":") else " | ") + pair
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    cfg, tc = parse_args(argv)
    check_config(cfg, tc)
    taken = os.path.isdir(tc.out) and (checkpoints(tc.out) or os.path.exists(os.path.join(tc.out, "best.npz")))
    if taken and not tc.resume:  # a second run would append to its log; the rotation would keep the last-sorting files
        raise SystemExit(f"error: {tc.out} already holds a run's checkpoints: continue it with --resume, "
                         "or start a new run with another --out")
    mesh = make_mesh()
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    try:
        ds = data.load(tc.dataset, tc.data_dir, tc.size, tc.seq_len, tc.path)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    if tc.train_clips:
        ds = memorisation_set(ds, tc.train_clips)
    check(cfg, tc, ds, mesh.size)
    per_epoch = data.steps_per_epoch(ds.train, tc.batch_size)
    total_steps = tc.steps if tc.steps is not None else tc.epochs * per_epoch
    resolved = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tc),
                "data": {"name": ds.name, "encoding": ds.encoding, "sample_rate": ds.sample_rate, "seq_len": ds.seq_len}}
    say(format_config(resolved))
    unigram = unigram_entropy(ds.train)
    say(f"{len(ds.train)} train / {len(ds.validation)} validation / {len(ds.test)} test rows of {ds.seq_len} tokens; "
        f"unigram entropy {unigram:.2f} bits | {per_epoch} steps per epoch | {mesh.size} devices, "
        f"{jax.process_count()} processes")

    os.makedirs(tc.out, exist_ok=True)
    template = jax.eval_shape(lambda: init_state(cfg, tc))
    state, meta = load_latest(tc.out, cfg, template) if tc.resume else (None, None)
    if state is None and tc.warm_start:
        state, meta = warm_start(tc.warm_start, cfg, tc, template)
        say(f"warm start (leg {meta['leg']}) from the EMA weights of step {int(state['step'])} in "
            f"{' '.join(tc.warm_start)}: a fresh AdamW state, its warmup again")
    elif state is None:
        if tc.resume:
            say(f"no checkpoint in {tc.out}: starting from scratch")
        state, meta = jax.jit(lambda: init_state(cfg, tc))(), {"best_val": None}
    elif meta.get("train", {}).get("train_clips") != tc.train_clips:  # another validation split: best_val would mislead
        raise SystemExit(f"error: {tc.out} was trained with --train-clips {meta.get('train', {}).get('train_clips')}, "
                         f"not {tc.train_clips}: resume with the same value, or use another --out")
    else:
        say(f"resumed from step {int(state['step'])}")
    state = jax.device_put(state, NamedSharding(mesh, P()))
    say(f"params: {pf.count_params(state['params']):,}")
    if lead:
        with open(os.path.join(tc.out, "config.json"), "w") as f:
            json.dump(resolved, f, indent=1)

    train_step, evaluate = make_train_step(cfg, tc, mesh), make_evaluate(cfg, mesh, tc.dtype)
    rows = NamedSharding(mesh, P("data"))
    eval_batch = max(mesh.size, (tc.microbatch or tc.batch_size))
    log = open(os.path.join(tc.out, "log.jsonl"), "a") if lead else None
    best_val, leg = meta.get("best_val"), meta.get("leg", 1)
    run_start, minutes_before = time.perf_counter(), meta.get("minutes", 0.0)
    minutes = lambda: round(minutes_before + (time.perf_counter() - run_start) / 60, 4)  # wall clock, all runs

    def write(record):
        say(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def save(step, epoch, name=None):
        if not lead:
            return
        meta = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tc), "data": resolved["data"],
                "step": step, "epoch": epoch, "best_val": best_val, "minutes": minutes(), "leg": leg}
        save_checkpoint(os.path.join(tc.out, name or f"ckpt_{step:08d}.npz"), state, meta)
        for old in checkpoints(tc.out)[:-tc.keep]:
            os.remove(old)

    def draw_curves():  # OUT/curves.png from the log so far: redrawn at every evaluation, so a long run can be watched
        if lead:
            metrics.save_figure(metrics.figure_curves(metrics.read_log(tc.out), f"Learning curves: {tc.out}"),
                                os.path.join(tc.out, "curves.png"))

    def run_eval(step, epoch):
        nonlocal best_val
        record = {"step": step, "epoch": epoch, "minutes": minutes()}
        for name in ("validation", "test"):
            key = "val_nll_bits" if name == "validation" else "test_nll_bits"
            record[key] = evaluate(state["ema"], subset(getattr(ds, name), tc.eval_clips), eval_batch)
        write(record)
        draw_curves()
        if best_val is None or record["val_nll_bits"] < best_val:
            best_val = record["val_nll_bits"]
            save(step, epoch, "best.npz")

    if tc.warm_start and "warm_start" in meta:  # the log marks where a leg begins (curves.png draws it)
        write({"step": int(state["step"]), "minutes": minutes(), "leg": leg, "warm_start": meta["warm_start"]})
    with interruptible() as stop:
        start = int(state["step"])
        step = epoch = start
        timer, timed_steps, compile_s = None, 0, None
        budget_start = time.perf_counter()  # --minutes: this run's budget (a resumed run's decay starts again)
        deadline = budget_start + 60 * tc.minutes if tc.minutes else math.inf
        snapshots = 1  # the next snapshot's number
        for step, epoch, tokens, mask in train_batches(ds.train, tc, start):
            if step >= total_steps or stop["signal"] or time.perf_counter() >= deadline:
                break
            t0 = time.perf_counter()
            progress = max(step / max(total_steps, 1), (t0 - budget_start) / (60 * tc.minutes) if tc.minutes else 0.0)
            state, stats = train_step(state, global_batch(tokens, rows), global_batch(mask, rows),
                                      np.float32(lr_factor(tc, progress)))
            if compile_s is None:  # the first step compiles: time it apart
                jax.block_until_ready(stats)
                compile_s = time.perf_counter() - t0
                say(f"compiled and ran the first step in {compile_s:.1f} s")
                timer, timed_steps = time.perf_counter(), 0
            else:
                timed_steps += 1
            done = step + 1
            bad_run = int(state["bad_run"])
            if done % tc.log_every == 0 or done == total_steps or bad_run:
                stats = jax.device_get(stats)
                elapsed = time.perf_counter() - timer
                ms = 1000 * elapsed / max(timed_steps, 1)
                write({"step": done, "epoch": epoch, "minutes": minutes(), "loss_bits": float(stats["loss_bits"]),
                       "grad_norm": float(stats["grad_norm"]), "lr": float(stats["lr"]), "ms_per_step": ms,
                       "tokens_per_s": float(stats["tokens"]) * 1000 / ms, "skipped": int(state["skipped"]),
                       "eta_min": min(ms * (total_steps - done), 1000 * (deadline - time.perf_counter())) / 60000})
            if bad_run >= tc.max_bad_steps:
                save(done, epoch)  # the skipped steps left the parameters as they were: a good state
                raise SystemExit(f"error: {tc.max_bad_steps} updates in a row skipped (loss NaN/inf or gradient "
                                 f"norm > {tc.skip_norm}) at step {done}; last good state saved in {tc.out}")
            end_of_epoch = done % per_epoch == 0
            if end_of_epoch or (tc.eval_every and done % tc.eval_every == 0):
                run_eval(done, epoch)
            if end_of_epoch or done % tc.ckpt_every == 0:
                save(done, epoch + end_of_epoch)
            if tc.snapshot_minutes and time.perf_counter() - budget_start >= 60 * tc.snapshot_minutes * snapshots:
                save(done, epoch + end_of_epoch, f"at_{tc.snapshot_minutes * snapshots:g}min.npz")
                snapshots += 1
        done = int(state["step"])
        if stop["signal"]:
            save(done, epoch)
            say(f"interrupted: saved step {done} in {tc.out}; continue with --resume")
            return 130
        if done < total_steps:
            say(f"the --minutes {tc.minutes:g} budget is spent at step {done}: finishing the run")
        if done > start and (done % per_epoch) and not (tc.eval_every and done % tc.eval_every == 0):
            run_eval(done, epoch)
        save(done, epoch)
        say(f"done: {done} steps, best validation NLL {best_val:.3f} bits (uniform guess: 8 bits, unigram "
            f"{unigram:.2f} bits)" if best_val is not None else f"done: {done} steps")
    if log:
        log.close()
    if done > 0:
        draw_curves()
        say(f"wrote {os.path.join(tc.out, 'curves.png')}")
    if lead and jax.process_count() == 1 and tc.report_samples and ds.sample_rate == metrics.SAMPLE_RATE:
        sample.quality_report(tc.out, tc.report_samples, dtype=tc.dtype, seed=tc.seed)  # (one process: sampling)
    say(f"more samples: python sample.py --checkpoint {tc.out} --n 16 --out {os.path.join(tc.out, 'more')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
