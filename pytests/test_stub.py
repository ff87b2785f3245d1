"""priv/stubs/erlang.pyi, the editor stub of the port's built-in `erlang` module, names
exactly what the module offers."""

import ast
from pathlib import Path

STUB = Path(__file__).resolve().parent.parent / "priv" / "stubs" / "erlang.pyi"


def stub_names():
    tree = ast.parse(STUB.read_text())
    names, members = set(), {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
            members[node.name] = {
                n.name for n in node.body
                if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
            }
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
    return names, members


def test_stub_names_match_dir_erlang(port):
    actual = port.eval_ok("[n for n in dir(__import__('erlang')) if not n.startswith('_')]")
    names, _ = stub_names()
    assert sorted(names) == sorted(n.decode() for n in actual)


def test_stub_members_exist(port):
    _, members = stub_names()
    for cls, names in members.items():
        for name in sorted(names):
            assert port.eval_ok("hasattr(__import__('erlang').%s, %r)" % (cls, name)) is True, (cls, name)
