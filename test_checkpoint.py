"""checkpoint.py: what a checkpoint holds, which file each command loads from a run folder, and
what is refused (another shape, a missing array, a pickled object, another pf.py's config)."""
import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

import checkpoint
import pf

CFG = pf.Config(pooling=(2,), layers=(1, 1), d_model=16, d_rnn=64)


def random_params(seed, cfg=CFG):
    shapes = jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def save(path, step, ema, params=None, cfg=CFG):
    meta = {"model": dataclasses.asdict(cfg), "step": step, "data": {"name": "x"}}
    state = {"ema": ema, **({"params": params} if params is not None else {})}
    checkpoint.save_checkpoint(str(path), state, meta)


def same(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_save_then_restore_gives_every_array_back_by_tree_path(tmp_path):
    ema, params = random_params(0), random_params(1)
    save(tmp_path / "c.npz", 5, ema, params)
    meta, arrays = checkpoint.read_checkpoint(str(tmp_path / "c.npz"))
    assert meta["step"] == 5 and "ema/skip_block/down_pool/w" in arrays and "params/head/b" in arrays
    template = jax.eval_shape(lambda: {"ema": ema, "params": params})
    back = checkpoint.restore(template, arrays, "c.npz")
    assert same(back["ema"], ema) and same(back["params"], params)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # written through a renamed temporary


def test_load_model_takes_best_npz_before_a_newer_checkpoint_and_the_ema_weights(tmp_path):
    best, newer = random_params(0), random_params(1)
    save(tmp_path / "best.npz", 5, best, params=random_params(2))
    save(tmp_path / "ckpt_00000010.npz", 10, newer)
    cfg, params, meta = checkpoint.load_model(str(tmp_path))
    assert cfg == CFG and meta["step"] == 5 and same(params, best)  # the best EMA, not the raw params
    # a file path loads that file, whatever its name
    _, params, meta = checkpoint.load_model(str(tmp_path / "ckpt_00000010.npz"))
    assert meta["step"] == 10 and same(params, newer)


@pytest.mark.parametrize("changes", [
    {"skip": "long", "placement": "after", "deepest": "attention", "embedding": "learned", "norm": "rms",
     "gated": False, "groups": 2, "ring": "circle", "scale": 0.5, "dropout": 0.1},
    {"complex_rnn": False, "embedding": "linear", "norm": "none", "scale": 0.0, "pooling": (2, 2), "layers": (1, 0, 2)},
])
def test_every_ablations_checkpoint_loads_back_as_its_own_config(changes, tmp_path):
    """A run of the thesis' ablations (every field it ablates off its default, between the two cases) is
    sampled and scored as itself: load_model gives back the saved config, field by field, and its arrays."""
    cfg = dataclasses.replace(CFG, **changes)
    ema = random_params(0, cfg)
    save(tmp_path / "best.npz", 1, ema, cfg=cfg)
    loaded, params, _ = checkpoint.load_model(str(tmp_path))
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg) and same(params, ema)


def test_without_best_npz_the_newest_checkpoint_loads_quietly(tmp_path, capsys):
    for step in (3, 6):
        save(tmp_path / f"ckpt_{step:08d}.npz", step, random_params(step))
    (tmp_path / "ckpt_00000009.npz.123.tmp").write_bytes(b"half a checkpoint")  # a crash's leftover
    _, params, meta = checkpoint.load_model(str(tmp_path))
    assert meta["step"] == 6 and same(params, random_params(6))
    assert "unreadable" not in capsys.readouterr().out
    assert checkpoint.checkpoints(str(tmp_path)) == [str(tmp_path / f"ckpt_{s:08d}.npz") for s in (3, 6)]


def test_a_corrupt_newest_checkpoint_is_reported_and_the_one_before_used(tmp_path, capsys):
    save(tmp_path / "ckpt_00000003.npz", 3, random_params(3))
    save(tmp_path / "ckpt_00000006.npz", 6, random_params(6))
    raw = (tmp_path / "ckpt_00000006.npz").read_bytes()
    (tmp_path / "ckpt_00000006.npz").write_bytes(raw[: len(raw) // 2])  # truncated
    path, meta, _ = checkpoint.first_readable(reversed(checkpoint.checkpoints(str(tmp_path))))
    assert meta["step"] == 3 and path.endswith("ckpt_00000003.npz")
    assert "ckpt_00000006.npz is unreadable" in capsys.readouterr().out
    assert checkpoint.first_readable([]) is None
    # load_model: past a corrupt best.npz to the newest readable checkpoint; none readable, one error line
    (tmp_path / "best.npz").write_bytes(raw[: len(raw) // 2])
    _, params, meta = checkpoint.load_model(str(tmp_path))
    assert meta["step"] == 3 and same(params, random_params(3))
    (tmp_path / "ckpt_00000003.npz").write_bytes(b"not a zip file")
    with pytest.raises(SystemExit) as e:
        checkpoint.load_model(str(tmp_path))
    assert str(e.value) == f"error: no readable checkpoint in {tmp_path}"


def test_a_pickled_object_array_is_refused(tmp_path, capsys):
    path = str(tmp_path / "evil.npz")
    np.savez(path, __meta__=np.array('{"step": 1}'), payload=np.array([{"code": "run me"}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        checkpoint.read_checkpoint(path)
    assert checkpoint.first_readable([path]) is None and "unreadable" in capsys.readouterr().out


def test_an_array_of_another_shape_or_a_missing_one_is_refused_by_name(tmp_path):
    params = random_params(0)
    template = jax.eval_shape(lambda: params)
    arrays = checkpoint.flatten(params)
    w = arrays["head/w"]
    with pytest.raises(ValueError, match="head/w is missing or has the wrong shape"):
        checkpoint.restore(template, {**arrays, "head/w": w.T.copy()}, "p")  # same size, transposed
    with pytest.raises(ValueError, match="head/b is missing"):
        checkpoint.restore(template, {k: v for k, v in arrays.items() if k != "head/b"}, "p")
    # load_model says so in one error line, naming the file it read in the run folder
    save(tmp_path / "best.npz", 1, {**params, "head": {"w": w.T.copy(), "b": params["head"]["b"]}})
    with pytest.raises(SystemExit, match=re.escape(f"error: {tmp_path / 'best.npz'} does not fit this pf.py")):
        checkpoint.load_model(str(tmp_path))


def test_config_mismatch_names_each_differing_field_with_both_values():
    saved = json.loads(json.dumps(dataclasses.asdict(CFG)))  # as a checkpoint's meta holds it: lists, not tuples
    assert checkpoint.config_mismatch(saved, CFG) == []
    other = dataclasses.replace(CFG, d_model=32, pooling=(4,))
    assert checkpoint.config_mismatch(saved, other) == ["pooling: checkpoint (2,) vs requested (4,)",
                                                          "d_model: checkpoint 16 vs requested 32"]


def test_a_state_split_into_parts_under_a_size_reads_back_whole(tmp_path):
    """save_parts: each file under max_bytes (a lent GPU brings back files of at most 16 MiB), read_parts
    gives every array back; parts of two different checkpoints, one part twice, or parts of two splits of
    one state that overlap, are refused."""
    ema = random_params(0)
    meta = {"model": dataclasses.asdict(CFG), "step": 9}
    total = sum(a.nbytes for a in jax.tree.leaves(ema))
    paths = checkpoint.save_parts(str(tmp_path / "ema"), {"ema": ema}, meta, max_bytes=total // 4)
    assert len(paths) >= 4 and paths[0].endswith(f"ema-1of{len(paths)}.npz")
    for p in paths:  # under the limit, unless one array alone is larger
        sizes = [a.nbytes for a in checkpoint.read_checkpoint(p)[1].values()]
        assert sum(sizes) <= total // 4 or len(sizes) == 1
    got_meta, arrays = checkpoint.read_parts(paths)
    assert got_meta == json.loads(json.dumps(meta)) and set(arrays) == {f"ema/{k}" for k in checkpoint.flatten(ema)}
    template = jax.eval_shape(lambda: {"ema": ema})
    assert same(checkpoint.restore(template, arrays, "parts")["ema"], ema)
    with pytest.raises(ValueError, match="repeats arrays"):
        checkpoint.read_parts([paths[0], paths[0]])
    # ten parts or more come back in part order (as numbers, not as strings: 2of12 before 10of12)
    keys = list(checkpoint.flatten({"ema": ema}))
    each = checkpoint.save_parts(str(tmp_path / "each"), {"ema": ema}, meta, max_bytes=1)  # an array a part
    assert len(each) == len(keys) >= 10
    assert each == [str(tmp_path / f"each-{i}of{len(keys)}.npz") for i in range(1, len(keys) + 1)]
    assert [k for p in each for k in checkpoint.read_checkpoint(p)[1]] == keys
    halves = checkpoint.save_parts(str(tmp_path / "halves"), {"ema": ema}, meta, max_bytes=total // 2)
    with pytest.raises(ValueError, match="repeats arrays"):  # the same state split twice: parts that overlap
        checkpoint.read_parts([halves[0], paths[0]])
    other = checkpoint.save_parts(str(tmp_path / "other"), {"ema": ema}, {**meta, "step": 10}, max_bytes=total // 4)
    with pytest.raises(ValueError, match="another checkpoint"):
        checkpoint.read_parts([paths[0], other[1]])


def test_parts_are_planned_in_order_under_the_limit():
    assert checkpoint.plan_parts([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert checkpoint.plan_parts([4, 7, 2, 9, 1], 10) == [[0], [1, 2], [3, 4]]
    assert checkpoint.plan_parts([12, 3], 10) == [[0], [1]]  # an array larger than the limit stands alone
    assert checkpoint.plan_parts([], 10) == [[]]
