"""Checkpoints: .npz files of plain arrays keyed by tree path, plus a JSON meta record (no pickle),
written atomically. train.py writes and resumes them; sample.py and metrics.py load the model from
them (`load_model`). Imports only pf and data, so every script can import it and the imports run
one way: data <- pf <- checkpoint <- metrics <- sample <- train.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import data
import pf


def flatten(tree):
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def write_npz(path, arrays, meta):
    data.write_atomic(path, lambda f: np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays))


def save_checkpoint(path, state, meta):
    """Plain arrays keyed by tree path plus a JSON meta record, written atomically."""
    write_npz(path, {k: np.asarray(jax.device_get(v)) for k, v in flatten(state).items()}, meta)


def read_checkpoint(path):
    """-> (meta dict, {tree path: array}). Raises on a corrupt or truncated file (zip CRC checks)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return json.loads(str(arrays.pop("__meta__"))), arrays


def plan_parts(sizes, max_bytes):
    """Consecutive groups of arrays (by their byte sizes, in order), a new group started where the next
    array would take the current one past max_bytes: -> a list of index lists."""
    parts, size = [[]], 0
    for i, n in enumerate(sizes):
        if parts[-1] and size + n > max_bytes:
            parts, size = parts + [[]], 0
        parts[-1].append(i)
        size += n
    return parts


def save_parts(prefix, state, meta, max_bytes):
    """A state's arrays in .npz files of at most max_bytes of arrays each, in order (plan_parts;
    PREFIX-1of2.npz, ...: for a machine that returns files of at most 16 MiB), each with the meta
    record. -> the paths."""
    arrays = [(k, np.asarray(jax.device_get(v))) for k, v in flatten(state).items()]
    parts = plan_parts([a.nbytes for _, a in arrays], max_bytes)
    paths = [f"{prefix}-{i}of{len(parts)}.npz" for i in range(1, len(parts) + 1)]
    for path, part in zip(paths, parts):
        write_npz(path, dict(arrays[i] for i in part), meta)
    return paths


def read_parts(paths):
    """(meta, {tree path: array}) of a state saved whole or in parts (save_parts): every part must hold
    the same meta, and no array may come twice."""
    meta, arrays = None, {}
    for path in paths:
        m, a = read_checkpoint(path)
        if meta is not None and m != meta:
            raise ValueError(f"{path} is a part of another checkpoint (its meta record differs)")
        if set(a) & set(arrays):
            raise ValueError(f"{path} repeats arrays of an earlier part: {sorted(set(a) & set(arrays))[:3]}")
        meta, arrays = m, {**arrays, **a}
    return meta, arrays


def config_mismatch(saved, cfg):
    """Names of the model fields where a checkpoint's config differs from the requested one."""
    theirs = dataclasses.asdict(pf.Config(**saved))
    return [f"{k}: checkpoint {theirs[k]} vs requested {v}" for k, v in dataclasses.asdict(cfg).items()
            if theirs[k] != v]


def restore(template, arrays, path):
    """Fill the template state's tree with the checkpoint's arrays, checking every path and shape."""
    leaves = []
    for key, leaf in flatten(template).items():
        if key not in arrays or arrays[key].shape != leaf.shape:
            raise ValueError(f"{path}: {key} is missing or has the wrong shape")
        leaves.append(jnp.asarray(arrays[key], leaf.dtype))
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def checkpoints(out):
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.startswith("ckpt_") and f.endswith(".npz"))


def first_readable(paths):
    """(path, meta, arrays) of the first checkpoint in paths that reads cleanly; a corrupt or
    truncated one is reported and the next tried. None if there is none."""
    for path in paths:
        try:
            return (path, *read_checkpoint(path))
        except Exception as e:  # truncated zip, bad CRC, bad JSON...
            print(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying the previous one")
    return None


def load_model(checkpoint):
    """(cfg, ema params, meta) from a run folder (best.npz, else the newest checkpoint) or an .npz
    file: what sample.py and metrics.py evaluate."""
    if not os.path.exists(checkpoint):
        raise SystemExit(f"error: --checkpoint {checkpoint}: no such run folder or .npz file "
                         f"(a train.py --out folder, e.g. runs/digits)")
    best = os.path.join(checkpoint, "best.npz")
    paths = [checkpoint] if checkpoint.endswith(".npz") else \
        [best] * os.path.exists(best) + list(reversed(checkpoints(checkpoint)))
    found = first_readable(paths)
    if found is None:
        raise SystemExit(f"error: no readable checkpoint in {checkpoint}")
    path, meta, arrays = found
    try:
        cfg = pf.Config(**meta["model"])
        template = jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))
        ema = {k[len("ema/"):]: v for k, v in arrays.items() if k.startswith("ema/")}
        return cfg, restore(template, ema, path), meta
    except (TypeError, ValueError) as e:  # a checkpoint of another version of pf.py
        raise SystemExit(f"error: {path} does not fit this pf.py ({e})")
