"""docs/PROMISES.md maps every documented promise to the tests that pin it. This checks that the
list names only tests that exist: a pytest function defined at the top level of the named file,
a Common Test case defined in the named suite and listed in its all(), an ExUnit test (its
name in snake case), or a Rust #[test]."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMISES = os.path.join(REPO, "docs", "PROMISES.md")

REF = re.compile(r"`([A-Za-z0-9_./-]+)::([A-Za-z_][A-Za-z0-9_]*)`")


def rows():
    """(promise, [(file, test), ...]) for every table row of the list."""
    out = []
    with open(PROMISES, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or len(cells) != 2 or cells[0] in ("promise", "---"):
                continue
            out.append((cells[0], REF.findall(cells[1])))
    return out


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def ct_all(src):
    """The case names listed in a suite's all() (comments dropped)."""
    m = re.search(r"^all\(\)\s*->\s*\[(.*?)\]\.", src, re.M | re.S)
    assert m, "no all() -> [...] in the suite"
    body = re.sub(r"%[^\n]*", "", m.group(1))
    return {name.strip() for name in body.split(",") if name.strip()}


def exists(path, test):
    if not os.path.isfile(os.path.join(REPO, path)):
        return "no file %s" % path
    src = read(path)
    if path.endswith(".py"):
        if not re.search(r"^def %s\(" % re.escape(test), src, re.M):
            return "no top-level def %s in %s" % (test, path)
    elif path.endswith(".erl"):
        if not re.search(r"^%s\(" % re.escape(test), src, re.M):
            return "no function %s/1 in %s" % (test, path)
        if test not in ct_all(src):
            return "%s is not in all() of %s: it never runs" % (test, path)
    elif path.endswith(".exs"):
        # An ExUnit test: its name with every run of other characters than letters and
        # digits as one underscore ("a day, at most" is a_day_at_most).
        names = {re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
                 for name in re.findall(r'^\s*test "([^"]*)"', src, re.M)}
        if test not in names:
            return "no ExUnit test named %s in %s" % (test, path)
    elif path.endswith(".rs"):
        if not re.search(r"#\[test\]\s*(?:#\[[^\]]*\]\s*)*fn %s\(" % re.escape(test), src):
            return "no #[test] fn %s in %s" % (test, path)
    else:
        return "unknown kind of test file %s" % path
    return None


def test_the_list_is_not_empty_and_every_promise_names_a_test():
    found = rows()
    assert len(found) >= 50, "docs/PROMISES.md lists only %d promises" % len(found)
    unpinned = [promise for promise, refs in found if not refs]
    assert not unpinned, "promises without a test: %r" % unpinned


def test_every_named_test_exists():
    refs = sorted({ref for _, refs in rows() for ref in refs})
    problems = [p for p in (exists(path, test) for path, test in refs) if p]
    assert not problems, "docs/PROMISES.md names tests that do not exist:\n" + "\n".join(problems)


def test_the_checker_rejects_what_does_not_exist():
    assert exists("pytests/test_api.py", "test_no_such_test") is not None
    assert exists("ct_suites/py_call_SUITE.erl", "no_such_case") is not None
    assert exists("ct_suites/no_such_SUITE.erl", "call_errors") is not None
    assert exists("src/tests/fuzz.rs", "no_such_fuzz") is not None
    assert exists("pytests/test_api.py", "test_eval") is None
    assert exists("ct_suites/py_call_SUITE.erl", "call_errors") is None
