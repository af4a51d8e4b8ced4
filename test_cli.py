"""What a user sees at the command line: bad input ends in one `error: ...` line (no traceback),
--help gives every flag's meaning and default from the field comments, the config prints compactly."""
import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

import pf
import train

HERE = os.path.dirname(os.path.abspath(__file__))

BAD_INPUTS = {  # command: (arguments, words the error line must contain)
    "pf": (["pf.py", "--d-rnn", "100"], ["d_rnn=100", "multiple of 64"]),
    "pf-choice": (["pf.py", "--norm", "batch"], ["--norm", "'batch'", "'layer', 'rms', 'none'"]),
    "sample-int": (["sample.py", "--checkpoint", "a", "--out", "b", "--n", "x"], ["--n", "invalid int value: 'x'"]),
    "data": (["data.py", "--dataset", "bytes", "--path", "no/such/file"], ["no/such/file"]),
    "data-seq-len": (["data.py", "--dataset", "bytes", "--path", "no/such/file", "--seq-len", "0"],
                     ["--seq-len 0", ">= 1"]),
    "train-pooling": (["train.py", "--pooling", "3", "3", "--layers", "0", "1", "1"], ["16000", "3*3 = 9"]),
    "train-batch": (["train.py", "--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    "train-layers": (["train.py", "--layers", "1", "1"], ["layers [1, 1]", "4 entries"]),
    "train-seq-len": (["train.py", "--seq-len", "0", "--dataset", "bytes", "--path", "no/such/file"],
                      ["--seq-len 0", ">= 1"]),  # checked first, and not taken as "the dataset's own length"
    "sample-checkpoint": (["sample.py", "--checkpoint", "no/such/dir", "--out", "x"], ["no/such/dir"]),
    "sample-n": (["sample.py", "--checkpoint", "no/such/dir", "--out", "x", "--n", "0"], ["--n 0", ">= 1"]),
    "metrics-samples": (["metrics.py", "evaluate", "--samples", "no/such/dir"], ["no/such/dir"]),
    "metrics-classifier": (["metrics.py", "evaluate", "--samples", "two_wavs", "--dataset", "sc09"],
                           ["classifier", "train-classifier"]),  # sc09-espeak's ships in classifiers/
    "metrics-figures": (["metrics.py", "figures", "--init", "square"], ["square", "small | half"]),
    "metrics-labels": (["metrics.py", "compare", "run_a", "run_b", "--figure", "x.png", "--labels", "a"],
                       ["--labels", "1 names for 2 runs"]),
    "bench": (["bench.py", "--part", "train", "--model", '{"d_rnn": 100}'], ["d_rnn=100"]),
}


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Every BAD_INPUTS command at once (each imports JAX: in parallel, not one after another), in an
    empty folder, so that no data or run folder exists."""
    cwd = tmp_path_factory.mktemp("cli")
    os.makedirs(cwd / "two_wavs")
    for name in ("a.wav", "b.wav"):
        (cwd / "two_wavs" / name).write_bytes(b"")
    procs = {name: subprocess.Popen([sys.executable, os.path.join(HERE, args[0]), *args[1:]], cwd=cwd,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in BAD_INPUTS.items()}
    return {name: (p.wait(timeout=300), p.stderr.read()) for name, p in procs.items()}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_ends_in_one_error_line(bad_input_runs, name):
    code, stderr = bad_input_runs[name]
    lines = stderr.strip().splitlines()
    assert code != 0 and "Traceback" not in stderr, stderr
    assert len([line for line in lines if line.startswith("error:")]) == 1 and lines[-1].startswith("error:"), stderr
    for word in BAD_INPUTS[name][1]:
        assert word in lines[-1], (word, lines[-1])


def help_text(argv, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse: one line per flag, no wrapping
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv + ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("dataset", ["sc09-espeak", "sc09"])
def test_help_shows_every_fields_comment_and_the_presets_default(dataset, monkeypatch, capsys):
    text = help_text(["--dataset", dataset], monkeypatch, capsys)
    model_preset, train_preset = train.PRESETS[dataset]
    for cls, preset in ((pf.Config, model_preset), (train.TrainConfig, train_preset)):
        comments = pf.field_comments(cls)
        for f in dataclasses.fields(cls):
            assert comments.get(f.name), f"{cls.__name__}.{f.name} has no comment: its --help would be empty"
            default = preset.get(f.name, getattr(cls(), f.name))
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            line = f"{comments[f.name]} (default: {shown})"
            assert line in text, f"--{f.name.replace('_', '-')}: {line!r} not in --help"
    assert "(default: 4 4 5)" in text if dataset == "sc09-espeak" else "(default: 2 4 4 5)" in text


@dataclass(frozen=True)
class Tricky:
    plain: int = 1  # one comment
    hashed: str = "#not a comment"  # the real one, 100%
    spread: tuple = (1,
                     2)  # after a line break
    bare: int = 3
    # a section comment belongs to no field
    plain_too: int = 4  # the last


def test_field_comments_reads_each_fields_own_comment():
    assert pf.field_comments(Tricky) == {"plain": "one comment", "hashed": "the real one, 100%",
                                         "spread": "after a line break", "plain_too": "the last"}
    assert pf.flag_help("100%", 1) == "100%% (default: 1)"  # argparse formats help with %


def test_other_commands_help_gives_defaults(monkeypatch, capsys):
    import data
    import metrics
    import sample
    monkeypatch.setenv("COLUMNS", "1000")
    for main, argv, expected in ((sample.main, [], ["--n N  clips to write (default: 16)",
                                                    "--top-p TOP_P  nucleus sampling"]),
                                 (data.main, [], ["--data-dir DATA_DIR  datasets and their .npy cache live here "
                                                  "(default: data)"]),
                                 (metrics.main, ["train-classifier"], ["--steps STEPS  training steps (default: 1000)"])):
        with pytest.raises(SystemExit):
            main(argv + ["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for line in expected:
            assert " ".join(line.split()) in text, (line, text)


def test_resolved_config_prints_in_a_few_lines():
    cfg, tc = train.parse_args([])
    resolved = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tc),
                "data": {"name": "sc09-espeak", "encoding": "mu-law", "sample_rate": 16000, "seq_len": 16000}}
    text = train.format_config(resolved)
    lines = text.splitlines()
    assert len(lines) <= 12 and max(map(len, lines)) <= 100, text
    assert "pooling 4,4,5 | layers 0,1,1,2" in text
    for part in resolved.values():  # every field with its value, none split across lines
        for k, v in part.items():
            assert any(f"{k} {','.join(map(str, v)) if isinstance(v, tuple) else v}" in line for line in lines), k


def test_the_test_session_removes_the_compilation_cache_it_made_and_keeps_one_it_was_given(tmp_path):
    """conftest.py's cache is fresh per session: one it made is gone when the session ends (each full run
    left ~33 MB in /tmp before), and pytest-xdist's workers make none of their own; one named by
    JAX_COMPILATION_CACHE_DIR is the caller's and stays."""
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path)
    (tmp_path / "test_seen.py").write_text(
        "import os\n\ndef test_seen():\n"
        "    cache = os.environ['JAX_COMPILATION_CACHE_DIR']\n    assert os.path.isdir(cache)\n"
        "    open(os.path.join(os.path.dirname(__file__), 'cache.txt'), 'w').write(cache)\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    tmp, mine = tmp_path / "tmp", tmp_path / "mine"
    tmp.mkdir()
    mine.mkdir()
    for given in (None, str(mine)):
        run_env = {**env, "TMPDIR": str(tmp)} if given is None else {**env, "JAX_COMPILATION_CACHE_DIR": given}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "test_seen.py"]
        proc = subprocess.run(command, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        cache = (tmp_path / "cache.txt").read_text()
        if given is None:
            assert os.path.dirname(cache) == str(tmp) and os.path.basename(cache).startswith("poolformer-test-cache-")
            left = [name for name in os.listdir(tmp) if name.startswith("poolformer-test-cache-")]
            assert left == []  # made once, used by the test, removed at the end
        else:
            assert cache == given and os.path.isdir(given)
