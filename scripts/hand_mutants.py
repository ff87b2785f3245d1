#!/usr/bin/env python3
"""Applies hand-written mutants, one patch file each, and runs the tests docs/PROMISES.md maps
them to: a mutant is caught when one of those tests fails.

    scripts/hand_mutants.py [PATCH ...]     (default: mutants/erlang/*.patch mutants/rust/*.patch)

A patch file starts with a header, then the diff (`git diff` output):

    Mutant: what the change breaks, in a sentence
    Promise: a piece of the text of a promise in docs/PROMISES.md (one line per promise)
    Tests: file::test ...        (optional: tests to run besides those the promises name)

For every promise named, the tests of its row are run (the "pinned by" and "boundary" columns):
pytest functions first, then Rust tests, then Common Test cases, stopping at the first red (a
test command still running after MUTANT_TEST_TIMEOUT seconds, default 600, hangs: caught). The
tree is rebuilt (`make all`) after applying and after reverting, so a Rust mutant costs a
release build each way. The patch is always reverted, also on Ctrl-C. Prints one line per
mutant and `N caught, N missed, N invalid`; exits 1 if any was missed or invalid.
"""

import glob
import os
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMISES = os.path.join(REPO, "docs", "PROMISES.md")
REF = re.compile(r"`([A-Za-z0-9_./-]+)::([A-Za-z_][A-Za-z0-9_]*)`|\b([A-Za-z0-9_./-]+)::([A-Za-z_][A-Za-z0-9_]*)")
LOGDIR = os.path.join(REPO, "_build", "mutants", "ct_logs")
# A test command that runs longer than this under a mutant hangs because of it: caught.
TEST_TIMEOUT = int(os.environ.get("MUTANT_TEST_TIMEOUT", "600"))


def refs_in(text):
    return [(a or c, b or d) for a, b, c, d in REF.findall(text)]


def promise_rows():
    """(promise text, [(file, test), ...]) for every row of docs/PROMISES.md's tables."""
    rows = []
    with open(PROMISES, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            if not line.startswith("|") or len(cells) < 2 or cells[0] in ("promise", "---"):
                continue
            rows.append((cells[0], refs_in(" ".join(cells[1:]))))
    return rows


def read_patch(path):
    """(header fields, diff text) of a mutant patch file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.find("diff --git ")
    if start < 0:
        raise ValueError("%s holds no `diff --git` section" % path)
    header = {"Mutant": [], "Promise": [], "Tests": []}
    for line in text[:start].splitlines():
        key, _, value = line.partition(":")
        if key in header and value.strip():
            header[key].append(value.strip())
    return header, text[start:]


def tests_for(header):
    """The tests a mutant must fail, in the order they run (cheap kinds first)."""
    rows = promise_rows()
    refs = []
    for promise in header["Promise"]:
        matched = [r for p, r in rows if promise in p]
        if not matched:
            raise ValueError("no promise in docs/PROMISES.md contains %r" % promise)
        for r in matched:
            refs.extend(r)
    for line in header["Tests"]:
        refs.extend(refs_in(line))
    seen, out = set(), []
    for ref in refs:
        if ref not in seen:
            seen.add(ref)
            out.append(ref)
    kind = {".py": 0, ".rs": 1, ".erl": 2}
    return sorted(out, key=lambda r: kind[os.path.splitext(r[0])[1]])


def commands(refs):
    """(label, argv, env) per test command: one pytest run, one cargo test per Rust test, one
    ct run per suite."""
    env = dict(os.environ, PYPORT_BIN=os.path.join(REPO, "priv", "pyport"))
    py = ["%s::%s" % r for r in refs if r[0].endswith(".py")]
    out = []
    if py:
        out.append(("pytest", [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] + py, env))
    for path, test in refs:
        if path.endswith(".rs"):
            out.append(("cargo %s" % test, ["cargo", "test", "--release", "--locked", "--quiet", test], env))
    suites = {}
    for path, test in refs:
        if path.endswith(".erl"):
            suites.setdefault(path, []).append(test)
    for path, cases in suites.items():
        argv = ["bash", "scripts/ct.sh", LOGDIR, "-suite", path[: -len(".erl")], "-case"] + cases
        out.append(("ct %s" % os.path.basename(path), argv, env))
    return out


def run(argv, env=None, log=None, timeout=None):
    """The command's exit status, or None if it ran past `timeout` seconds (its process group,
    Erlang nodes and port programs included, is then killed)."""
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def build(log):
    return run(["make", "--no-print-directory", "all"], log=log) == 0


def try_mutant(path, log):
    """'caught', 'missed' or 'invalid', and what decided it."""
    header, diff = read_patch(path)
    refs = tests_for(header)
    if not refs:
        return "invalid", "no tests"
    if subprocess.run(["git", "apply", "--check", "-"], cwd=REPO, input=diff.encode(),
                      stdout=log, stderr=subprocess.STDOUT).returncode != 0:
        return "invalid", "does not apply"
    subprocess.run(["git", "apply", "-"], cwd=REPO, input=diff.encode(), check=True)
    try:
        if not build(log):
            return "invalid", "does not build"
        for label, argv, env in commands(refs):
            print("    running %s" % label, flush=True)
            log.write(("\n=== %s: %s\n" % (label, " ".join(argv))).encode())
            log.flush()
            status = run(argv, env=env, log=log, timeout=TEST_TIMEOUT)
            if status is None:
                return "caught", "%s hung past %d s" % (label, TEST_TIMEOUT)
            if status != 0:
                return "caught", label
        return "missed", "%d tests passed" % len(refs)
    finally:
        subprocess.run(["git", "apply", "-R", "-"], cwd=REPO, input=diff.encode(), check=True)


def main(argv):
    patches = argv or sorted(glob.glob(os.path.join(REPO, "mutants", "erlang", "*.patch"))
                             + glob.glob(os.path.join(REPO, "mutants", "rust", "*.patch")))
    os.makedirs(LOGDIR, exist_ok=True)
    counts = {"caught": 0, "missed": 0, "invalid": 0}
    results = []
    for path in patches:
        name = os.path.relpath(os.path.abspath(path), REPO)
        logpath = os.path.join(REPO, "_build", "mutants", os.path.basename(path) + ".log")
        print("%s" % name, flush=True)
        t0 = time.monotonic()
        with open(logpath, "wb") as log:
            try:
                verdict, why = try_mutant(path, log)
            except ValueError as e:
                verdict, why = "invalid", str(e)
        counts[verdict] += 1
        line = "%-7s %s (%s; %.0f s; log %s)" % (verdict, name, why, time.monotonic() - t0,
                                              os.path.relpath(logpath, REPO))
        results.append(line)
        print("  " + line, flush=True)
    with open(os.devnull, "wb") as null:
        build(null)  # the tree as it was
    print("\n".join(results))
    print("%(caught)d caught, %(missed)d missed, %(invalid)d invalid" % counts)
    return 1 if counts["missed"] or counts["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
