"""The README and docs/ stay true to the code: every `python <script>.py ...` command they show parses
with that script's own flags and checks (no file is read, nothing runs), every `python -c` block
compiles and names only functions the project has, the `python pf.py` lines that state a parameter
count print it, and the README stays a front door (at most ~15 KB)."""
import ast
import glob
import importlib.util
import os
import re
import shlex

import jax
import pytest

import bench
import checkpoint
import data
import metrics
import pf
import sample
import train

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = ["README.md", *sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "docs", "*.md")))]
def ci_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, ".ci", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PARSE = {  # script -> its argument check (raises SystemExit on a bad command line)
    "train.py": lambda argv: train.check_config(*train.parse_args(argv)),
    "sample.py": sample.parse_args, "metrics.py": metrics.parse_args, "bench.py": bench.parse_args,
    "data.py": data.parse_args, "pf.py": pf.parse_args,
    ".ci/full_size.py": ci_script("full_size").parse_args, ".ci/mutants.py": ci_script("mutants").parse_args,
}
MODULES = {"bench": bench, "checkpoint": checkpoint, "data": data, "metrics": metrics, "pf": pf, "sample": sample,
           "train": train}
PLACEHOLDERS = {"DIR": "runs/x", "RUN": "runs/x", "OUT": "runs/x", "P": "0.9", "M": "10", "N": "16", "S": "0",
                "L": "160", "T": "1.0", "FILE.wav": "x.wav", "RING": "small", "MODEL": "runs/x"}


def code_and_prose(text):
    """(code lines: indented by 4 or fenced; the rest of the text)."""
    code, prose, fenced = [], [], False
    for line in text.split("\n"):
        if line.strip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    ") and not line.lstrip().startswith(("-", "|", "*")):
            code.append(line.rstrip())  # indentation kept: a python -c block's body needs it
        else:
            prose.append(line)
    return code, "\n".join(prose)


def commands(text):
    """Every `python X.py ...` command of a markdown text, as an argv list after the script, with the
    placeholders (DIR, N, ...) given sample values: [(script, argv, the line it came from)]."""
    code, prose = code_and_prose(text)
    spans = [line.strip() for line in code] + [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose, re.S)]
    found = []
    for span in spans:
        span = span.split(" # ")[0].split("  #")[0]
        for part in re.split(r"&&|;|\bdo\b|\|", span):
            m = re.search(r"\bpython ((?:\.ci/)?\w+\.py)\b(.*)", part)
            if not m or m.group(1) not in PARSE or "--help" in part or "$@" in part or "<" in part or "..." in part \
                    or re.search(r"\s\[", part):  # usage synopses ([--flag X], <0..3>, ...) and --help
                continue
            argv = shlex.split(re.sub(r"\$\{?\w+\}?", "10", m.group(2)))
            found.append((m.group(1), [PLACEHOLDERS.get(a, a) for a in argv], part.strip()))
    return found


ALL = [(doc, *c) for doc in DOCS for c in commands(open(os.path.join(HERE, doc)).read())]


def test_the_docs_show_commands_of_every_script():
    assert len(ALL) > 40
    assert {script for _, script, _, _ in ALL} == set(PARSE)
    assert ("README.md", "train.py", [], "python train.py") in ALL  # the main job


@pytest.mark.parametrize("doc,script,argv,line", ALL, ids=[f"{d}:{line[:60]}" for d, _, _, line in ALL])
def test_every_documented_command_parses(doc, script, argv, line):
    PARSE[script](argv)  # SystemExit (an error line) on an unknown flag or a bad value


def test_a_wrong_flag_in_a_command_is_caught():
    (script, argv, _), = commands("    python train.py --minutes 10 --eval-evry 100")
    with pytest.raises(SystemExit):
        PARSE[script](argv)


def python_c_blocks(text):
    """The code of every `python -c "..."` block in the code lines of a markdown text."""
    code, _ = code_and_prose(text)
    blocks, current = [], None
    for line in code:
        if current is None and line.lstrip().startswith('python -c "'):
            indent = len(line) - len(line.lstrip())  # the block's own indentation, taken off every line
            current = [line.lstrip()[len('python -c "'):]]
        elif current is not None:
            current.append(line[indent:])
        if current is not None and current[-1].endswith('"'):
            current[-1] = current[-1][:-1]
            blocks.append("\n".join(current))
            current = None
    return blocks


BLOCKS = [(doc, b) for doc in DOCS for b in python_c_blocks(open(os.path.join(HERE, doc)).read())]


@pytest.mark.parametrize("doc,block", BLOCKS, ids=[f"{d}:{i}" for i, (d, _) in enumerate(BLOCKS)])
def test_python_c_blocks_compile_and_name_only_what_the_project_has(doc, block):
    tree = ast.parse(block)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in MODULES:
            assert hasattr(MODULES[node.value.id], node.attr), \
                f"{doc}: {node.value.id}.{node.attr} does not exist"


def test_python_c_blocks_are_found():
    assert len(BLOCKS) >= 4


def test_stated_parameter_counts_are_what_pf_py_prints():
    stated = [(argv, int(n)) for doc in DOCS for line in code_and_prose(open(os.path.join(HERE, doc)).read())[0]
              for n in re.findall(r"^\s*python pf\.py.*# params: (\d+)", line)
              for _, argv, _ in commands("    " + line.split("#")[0])]
    assert len(stated) >= 4
    for argv, n in stated:
        cfg = pf.parse_args(argv)
        assert pf.count_params(jax.eval_shape(lambda: pf.init(jax.random.key(0), cfg))) == n, argv


def test_the_readme_is_a_front_door():
    text = open(os.path.join(HERE, "README.md")).read()
    assert len(text.encode()) <= 15500
    assert "pip install -r requirements.txt && python train.py" in text
    command = "pip install -r requirements.txt -r requirements-dev.txt && python -m pytest -q -n 2 --dist worksteal"
    assert command in text  # the README's test command is the one CI runs (quietly)
    ci = open(os.path.join(HERE, ".ci", "run")).read()
    assert command.replace("pip install", "pip install -q") in ci


@pytest.mark.parametrize("doc", DOCS)
def test_every_linked_file_and_figure_exists(doc):
    links = re.findall(r"\]\(([^)#]+)\)", open(os.path.join(HERE, doc)).read())
    for link in links:
        assert link.startswith("http") or os.path.exists(os.path.join(HERE, os.path.dirname(doc), link)), link


@pytest.mark.parametrize("name,least", [("mutants.json", 90), ("mutants_blind.json", 360)])
def test_the_mutation_rounds_lists_fit_the_code(name, least):
    """Every mutant of .ci/mutants.json and of the held-out rounds finds its text exactly once (the runner
    refuses the list otherwise)."""
    runner = ci_script("mutants")
    mutants = runner.load(os.path.join(HERE, ".ci", name))
    files = {m["file"] for m in mutants}
    core = {f"{m}.py" for m in runner.MODULES[:6]}  # every list covers pf ... data; the held-out rounds more
    assert len(mutants) >= least and core <= files <= set(runner.FILES.values())


@pytest.mark.parametrize("doc", DOCS)
def test_no_placeholder_is_left(doc):
    text = open(os.path.join(HERE, doc)).read()
    assert not re.findall(r"^[A-Z_]{6,}$", text, re.M), doc  # a line left as a stand-in (FIGURES_HERE)
