"""docs/PROMISES.md maps every documented promise to the tests that pin it, and to the tests
that pin its edges (the "boundary" column). This checks that the list names only tests that
exist: a pytest function defined at the top level of the named file, a Common Test case defined
in the named suite and listed in its all(), an ExUnit test (its name in snake case), or a Rust
#[test]; and that every table row has its three cells, so that no row hides from these checks."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMISES = os.path.join(REPO, "docs", "PROMISES.md")

REF = re.compile(r"`([A-Za-z0-9_./-]+)::([A-Za-z_][A-Za-z0-9_]*)`")


NO_EDGE = "–"


def table_lines():
    """The cells of every table line of the list (header and separator lines included)."""
    with open(PROMISES, encoding="utf-8") as f:
        # a `\|` inside a cell is a pipe of the text, not a cell boundary
        return [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
                for line in f if line.startswith("|")]


def rows():
    """(promise, [(file, test), ...], [(file, test), ...] of its edges) for every row."""
    return [(cells[0], REF.findall(cells[1]), REF.findall(cells[2]))
            for cells in table_lines()
            if len(cells) == 3 and cells[0] not in ("promise", "---")]


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
    unpinned = [promise for promise, refs, _ in found if not refs]
    assert not unpinned, "promises without a test: %r" % unpinned


def test_every_row_has_a_promise_its_tests_and_its_boundary():
    """Three cells on every line (a row with two would escape every check here); the header
    names them; a boundary cell holds test references or says there is no edge."""
    bad = [cells for cells in table_lines() if len(cells) != 3]
    assert not bad, "table lines without exactly 3 cells: %r" % bad[:3]
    headers = [cells for cells in table_lines() if cells[0] == "promise"]
    assert headers and all(h == ["promise", "pinned by", "boundary"] for h in headers), headers
    odd = [cells[0] for cells in table_lines()
           if cells[0] not in ("promise", "---")
           and cells[2] != NO_EDGE and re.sub(REF, "", cells[2]).strip(", ") != ""]
    assert not odd, "boundary cells with something else than test references: %r" % odd
    with_edges = [r for r in rows() if r[2]]
    assert len(with_edges) >= 30, "only %d promises name a boundary test" % len(with_edges)


def test_every_named_test_exists():
    refs = sorted({ref for _, pinned, edges in rows() for ref in pinned + edges})
    problems = [p for p in (exists(path, test) for path, test in refs) if p]
    assert not problems, "docs/PROMISES.md names tests that do not exist:\n" + "\n".join(problems)


def test_the_checker_rejects_what_does_not_exist():
    assert exists("pytests/test_api.py", "test_no_such_test") is not None
    assert exists("ct_suites/py_call_SUITE.erl", "no_such_case") is not None
    assert exists("ct_suites/no_such_SUITE.erl", "call_errors") is not None
    assert exists("src/tests/fuzz.rs", "no_such_fuzz") is not None
    assert exists("pytests/test_api.py", "test_eval") is None
    assert exists("ct_suites/py_call_SUITE.erl", "call_errors") is None
