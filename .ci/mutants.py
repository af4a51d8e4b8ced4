"""The mutation round: bugs put by hand into pf, sample, train, checkpoint, metrics and data (the held-out
rounds also into bench and .ci/full_size), each run against the tests that should catch it; prints the
kill rate per module. Development only, not CI.

    python .ci/mutants.py                          # every mutant (about an hour on 2 cores)
    python .ci/mutants.py --module pf --module sample
    python .ci/mutants.py --only 3 17              # by number
    python .ci/mutants.py --list                   # the mutants, without running them
    python .ci/mutants.py --markdown docs/mutants.md   # also write the table of results
    python .ci/mutants.py --mutants .ci/mutants_blind.json   # the held-out rounds (docs/mutants.md)

Each mutant replaces one snippet, found exactly once, in a copy of the working tree, then runs
`python -m pytest -x -q -p no:cacheprovider -p no_shrink <selection>` there for each of its test selections
in turn (no_shrink: hypothesis stops at its first failing example): a failing run (or one past the time
limit) kills it. The mutants live in .ci/mutants.json: file, original, replacement, what a user would
get wrong, the tests that should catch it, and, for a mutant that changes nothing observable,
`equivalent` with the reason (listed, not run).
"""
import argparse
import collections
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTANTS = os.path.join(ROOT, ".ci", "mutants.json")
MODULES = ("pf", "sample", "train", "checkpoint", "metrics", "data", "bench", "full_size")
FILES = {m: f"{m}.py" for m in MODULES} | {"full_size": ".ci/full_size.py"}  # the GPU leg's script (round 3)


def module_of(mutant):
    """The module a mutant's file is (pf.py -> pf, .ci/full_size.py -> full_size)."""
    return os.path.basename(mutant["file"])[:-3]


def load(path=MUTANTS):
    with open(path) as f:
        mutants = json.load(f)
    for i, m in enumerate(mutants, 1):
        m["id"] = i
        with open(os.path.join(ROOT, m["file"])) as f:
            count = f.read().count(m["original"])
        if count != 1:
            raise SystemExit(f"error: mutant {i} ({m['file']}): its original text occurs {count} times, not once: "
                             f"{m['original']!r}")
    return mutants


def tracked_copy():
    """The working tree's files (tracked, or new and not ignored: no data, no runs) in a fresh temporary folder."""
    dest = tempfile.mkdtemp(prefix="mutants-")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))
    return dest


def pytest(selection, copy, timeout):
    """One pytest run of a selection ('test_x.py::test_y ...' or 'test_x.py -k EXPR') in the copy:
    -> (passed, the first failed test or pytest's last line)."""
    # One compilation cache per round, next to the copy: a cache kept from a round over other code can hand
    # a program compiled at other line numbers (JAX's cache key leaves out the source lines it records).
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": copy + "-jax-cache",
           "PYTHONPATH": os.pathsep.join([os.path.join(copy, ".ci"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", "-p", "no_shrink"]
    proc = subprocess.run(command + shlex.split(selection), cwd=copy, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode == 5:  # nothing collected: a selection that names no test is the list's bug, not a kill
        raise LookupError(f"the selection {selection!r} collects no test")
    failed = [line.split(" ", 2)[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return proc.returncode == 0, failed[0] if failed else f"pytest exit {proc.returncode}: {last}"


def run(mutant, copy, timeout):
    """Each of the mutant's test selections in turn, until one fails:
    -> ('killed' | 'survived' | 'timeout', seconds, the test that failed or None)."""
    path = os.path.join(copy, mutant["file"])
    with open(path) as f:
        source = f.read()
    with open(path, "w") as f:
        f.write(source.replace(mutant["original"], mutant["replacement"], 1))
    start, outcome, failed = time.perf_counter(), "survived", None
    try:
        for selection in mutant["tests"]:
            passed, failed = pytest(selection, copy, timeout)
            if not passed:
                outcome = "killed"
                break
        else:
            failed = None
    except subprocess.TimeoutExpired:
        outcome = "timeout"
    except LookupError as e:  # reported as the list's error; the round goes on
        outcome, failed = "error", str(e)
    finally:
        with open(path, "w") as f:
            f.write(source)
    return outcome, time.perf_counter() - start, failed


def kill_rates(results):
    """{module: (mutants, equivalent, killed, kill rate of the non-equivalent)}; a timeout counts as killed."""
    rates = {}
    for module, rs in by_module(results).items():
        eq = sum(r["outcome"] == "equivalent" for r in rs)
        killed = sum(r["outcome"] in ("killed", "timeout") for r in rs)
        rates[module] = (len(rs), eq, killed, killed / max(len(rs) - eq, 1))
    return rates


def table(results, before=None):
    """Markdown: per module the kill rate (and a before round's, from its --json, matched by the change),
    then every mutant with its outcome and the test that killed it."""
    key = lambda r: (r["file"], *(r["was"] if "was" in r else (r["original"], r["replacement"])))  # was: retargeted
    earlier = {key(r): r for r in before or []}
    old = [earlier[key(r)] for r in results if key(r) in earlier]
    rates, old_rates = kill_rates(results), kill_rates(old)
    lines = ["| module | mutants | equivalent | killed | survived | kill rate | before: kill rate (of the same mutants) |",
             "|---|---|---|---|---|---|---|"]
    for module, (n, eq, killed, rate) in rates.items():
        was = old_rates.get(module)
        was = f"{100 * was[3]:.0f}% ({was[2]} of {was[0] - was[1]})" if was else "-"
        lines.append(f"| {module} | {n} | {eq} | {killed} | {n - eq - killed} | {100 * rate:.0f}% | {was} |")
    lines += ["", "| # | file | change | what a user would get | before | now | killed by |", "|---|---|---|---|---|---|---|"]
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    for r in results:
        change = f"`{cell(r['original'])}` -> `{cell(r['replacement'])}`"
        by = r.get("equivalent") if r["outcome"] == "equivalent" else (r.get("killed_by") or "")
        was = earlier[key(r)]["outcome"] if key(r) in earlier else "(new)"
        lines.append(f"| {r['id']} | {r['file']} | {change} | {cell(r['what'])} | {was} | {r['outcome']} | {cell(by)} |")
    return "\n".join(lines) + "\n"


def by_module(results):
    groups = collections.OrderedDict((m, []) for m in MODULES)
    for r in results:
        groups[module_of(r)].append(r)
    return {m: rs for m, rs in groups.items() if rs}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mutants", default=MUTANTS,
                   help="the list to run (default .ci/mutants.json; .ci/mutants_blind.json holds the held-out rounds)")
    p.add_argument("--module", action="append", choices=MODULES, help="only this module's mutants (repeatable)")
    p.add_argument("--only", type=int, nargs="+", help="only these mutants, by number")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests; run nothing")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant's test run")
    p.add_argument("--markdown", help="also write the results as a markdown table here")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--before", help="an earlier round's --json: its kill rates beside these in --markdown")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    mutants = [m for m in load(a.mutants) if (not a.module or module_of(m) in a.module) and (not a.only or m["id"] in a.only)]
    if a.list:
        for m in mutants:
            print(f"{m['id']:3d} {m['file']:14s} {m['what']}\n    {m['original']!r} -> {m['replacement']!r}\n"
                  f"    {'equivalent: ' + m['equivalent'] if m.get('equivalent') else 'tests: ' + ' | '.join(m['tests'])}")
        return 0
    copy, results = tracked_copy(), []
    try:
        for m in mutants:
            if m.get("equivalent"):
                results.append({**m, "outcome": "equivalent"})
                continue
            outcome, seconds, failed = run(m, copy, a.timeout)
            results.append({**m, "outcome": outcome, "seconds": round(seconds, 1), "killed_by": failed})
            print(f"{m['id']:3d} {m['file']:14s} {outcome:9s} {seconds:6.1f} s  {failed or ''}", flush=True)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(copy + "-jax-cache", ignore_errors=True)
    before = None
    if a.before:
        with open(a.before) as f:
            before = json.load(f)
    print()
    print(table(results, before).split("\n\n")[0])
    survivors = [r for r in results if r["outcome"] == "survived"]
    for r in survivors:
        print(f"survived: {r['id']} {r['file']}: {r['what']}")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table(results, before))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
