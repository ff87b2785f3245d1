"""call / eval / exec / startup / stats, per-owner namespaces, exception shape, and the built-in
`erlang` module."""

import os
import textwrap

import pytest

from conftest import A, Atom, describe_error, pid, wait_until

STATS_KEYS = {"dicts", "dict_keys", "dict_bytes", "namespaces", "workers", "busy_workers", "queued", "generation", "worker_reads"}


def python_error(reason, typ):
    """`typ` is a str for a built-in exception class (sent as an atom) and bytes for any other
    class (sent as a binary of its qualified name: class names never become atoms)."""
    assert isinstance(reason, tuple) and len(reason) == 4 and reason[0] == "python", reason
    assert isinstance(reason[0], Atom), reason
    assert isinstance(reason[1], bytes if isinstance(typ, bytes) else Atom), reason
    assert reason[1] == typ, describe_error(reason)
    assert isinstance(reason[2], bytes) and isinstance(reason[3], bytes), reason
    return reason


# --- eval / exec / call -------------------------------------------------------------------------


def test_eval(port):
    assert port.eval_ok("1 + 2") == 3
    assert port.eval_ok("x * y", x=6, y=7) == 42


def test_exec_returns_undefined_and_keeps_definitions(port):
    assert port.exec_ok("y = x * 2\ndef f(a, b=10):\n    return a + b + y", x=21) is None
    assert port.eval_ok("y") == 42
    assert port.ok(port.call("__main__", "f", [1])) == 53
    assert port.ok(port.call("__main__", "f", [1], {"b": 0})) == 43
    # Locals are bound as variables: later calls see them too.
    assert port.eval_ok("x") == 21


def test_call_module_functions(port):
    assert port.ok(port.call("math", "sqrt", [16])) == 4.0
    assert port.ok(port.call("builtins", "int", ["ff"], {"base": 16})) == 255
    assert port.ok(port.call("builtins", "pow", [2, 200])) == 2**200
    assert port.ok(port.call("os", "path.join", ["a", "b"])) == b"a/b"
    assert port.ok(port.call("json", "dumps", [{"k": [1, 2]}], {"sort_keys": True})) == b'{"k": [1, 2]}'


def test_call_missing_attribute_is_attribute_error(port):
    r = port.err(port.call("math", "no_such_function"))
    python_error(r, "AttributeError")
    assert b"no_such_function" in r[2]
    r = port.err(port.call("os", "path.no_such_function"))
    python_error(r, "AttributeError")
    r = port.err(port.call("no_such_module_xyz", "f"))
    python_error(r, "ModuleNotFoundError")
    port.assert_serving()


def test_call_not_callable_is_not_callable_with_repr(port):
    r = port.err(port.call("math", "pi"))
    assert r == ("not_callable", b"3.141592653589793") and isinstance(r[0], Atom), r
    port.exec_ok("x = [1, 'two']")
    r = port.err(port.call("__main__", "x"))
    assert r == ("not_callable", b"[1, 'two']") and isinstance(r[0], Atom), r
    port.assert_serving()


def test_call_undefined_in_owner_namespace_is_name_error(port):
    r = port.err(port.call("__main__", "undefined_function"))
    python_error(r, "NameError")
    assert b"undefined_function" in r[2]
    port.assert_serving()


# --- exceptions ---------------------------------------------------------------------------------


def test_exception_shape(port):
    r = python_error(port.eval_err("1 / 0"), "ZeroDivisionError")
    assert r[2] == b"division by zero"
    assert b"Traceback" in r[3] and b"ZeroDivisionError" in r[3]


def test_user_exception_unicode_message(port):
    port.exec_ok("class MyError(Exception):\n    pass\n")
    r = python_error(port.exec_err("raise MyError('boom ü €')"), b"__main__.MyError")
    assert r[2] == "boom ü €".encode()
    assert b"MyError" in r[3]


def test_exception_message_is_str_of_exc(port):
    assert python_error(port.eval_err("{}['k']"), "KeyError")[2] == b"'k'"
    assert python_error(port.exec_err("raise ValueError()"), "ValueError")[2] == b""
    python_error(port.eval_err("undefined_name"), "NameError")
    python_error(port.exec_err("def f(:\n  pass"), "SyntaxError")
    python_error(port.eval_err("x = 1"), "SyntaxError")
    python_error(port.err(port.call("json", "loads", ["{bad"])), b"json.decoder.JSONDecodeError")


def test_exception_from_nested_call_has_traceback(port):
    port.exec_ok("def inner():\n    raise RuntimeError('deep')\ndef outer():\n    inner()\n")
    r = python_error(port.err(port.call("__main__", "outer")), "RuntimeError")
    assert b"inner" in r[3] and b"outer" in r[3]


def test_odd_exceptions(port):
    r = port.exec_err("class E(Exception):\n    def __str__(self):\n        raise ValueError('no str')\nraise E()")
    assert r[0] == "python" and r[1] == b"__main__.E" and isinstance(r[2], bytes), r
    r = python_error(port.exec_err("class Ошибка(Exception):\n    pass\nraise Ошибка('x')"), "__main__.Ошибка".encode())
    assert r[2] == b"x"
    python_error(port.exec_err("raise BaseException('base')"), "BaseException")
    port.assert_serving()


def test_base_exceptions_do_not_kill_the_port(port):
    python_error(port.exec_err("raise SystemExit(3)"), "SystemExit")
    port.assert_serving()
    python_error(port.exec_err("raise KeyboardInterrupt"), "KeyboardInterrupt")
    port.assert_serving()
    r = port.exec_err("import sys\nsys.exit(0)")
    python_error(r, "SystemExit")
    port.assert_serving()


# --- namespaces ---------------------------------------------------------------------------------


def namespaces(port):
    return port.stats()[A("namespaces")]


def test_namespaces_are_per_owner(port):
    a, b = pid(101), pid(102)
    port.exec_ok("secret = 'a-only'\ndef who():\n    return secret", owner=a)
    python_error(port.eval_err("secret", owner=b), "NameError")
    assert port.eval_ok("secret", owner=a) == b"a-only"
    python_error(port.err(port.call("__main__", "who", owner=b)), "NameError")
    port.exec_ok("secret = 'b-only'", owner=b)
    assert port.eval_ok("secret", owner=a) == b"a-only"
    assert port.ok(port.call("__main__", "who", owner=a)) == b"a-only"
    # Same pid number on another node is another process.
    python_error(port.eval_err("secret", owner=pid(101, node="other@host")), "NameError")


def test_owner_down_frees_namespace(port):
    base = namespaces(port)
    owners = [pid(200 + i) for i in range(3)]
    for i, o in enumerate(owners):
        port.exec_ok("v = %d" % i, owner=o)
    assert namespaces(port) == base + 3
    port.owner_down(owners[0])
    wait_until(lambda: namespaces(port) == base + 2, 5, "namespace count to drop after owner_down")
    python_error(port.eval_err("v", owner=owners[0]), "NameError")  # a fresh, empty namespace
    assert port.eval_ok("v", owner=owners[1]) == 1
    for o in owners:
        port.owner_down(o)
    wait_until(lambda: namespaces(port) == base, 5, "namespace count back to %d" % base)
    port.owner_down(pid(999))  # unknown owner: no reply, no harm
    port.assert_serving()


def test_owner_down_while_its_code_runs(port):
    o = pid(500)
    rid = port.exec(
        "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 0.5:\n"
        "    counter = globals().get('counter', 0) + 1\n",
        owner=o,
    )
    port.assert_serving()  # the loop is running (the queue is FIFO)
    port.owner_down(o)
    # owner_down frees the namespace and the dicts; it does not cancel (the Erlang side sends
    # {cancel, Id} for that): the running code finishes normally.
    assert port.ok(rid, timeout=30) is None
    port.assert_serving()
    python_error(port.eval_err("counter", owner=o), "NameError")


def test_closing_python_stdio_fds_does_not_break_the_protocol(port):
    port.exec_ok("import os\nos.close(0)\nos.close(1)\nos.close(2)")
    for _ in range(3):
        port.assert_serving()


def test_locals_rebinding_and_odd_keys(port):
    port.exec_ok("n = 1")
    assert port.eval_ok("n", n=2) == 2
    # Dunder / non-identifier keys: the Erlang side rejects them (badarg); if one reaches the
    # port it must answer and leave the namespace usable.
    for key in ("__builtins__", "not an identifier", "1x", ""):
        r = port.eval_err("1", **{key: 5})
        assert isinstance(r, tuple) and r[0] == "bad_request" and isinstance(r[1], bytes), r
    assert port.eval_ok("len([1, 2])") == 2
    port.assert_serving()


# --- startup / stats / environment --------------------------------------------------------------


def test_startup(port, tmp_path):
    (tmp_path / "pyport_test_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    assert port.ok(port.startup([str(tmp_path)], "STARTED = 41 + 1")) is None
    assert port.ok(port.call("pyport_test_mod", "triple", [5])) == 15
    assert port.eval_ok("__import__('sys').path[0]") == str(tmp_path).encode()
    assert port.eval_ok("__import__('__main__').STARTED") == 42
    r = port.err(port.startup([], "raise ValueError('bad startup')"))
    python_error(r, "ValueError")
    port.assert_serving()


def test_stats_shape(port_factory):
    p = port_factory(["--generation", "7", "--workers", "2", "--max-workers", "4"])
    s = p.stats()
    assert isinstance(s, dict)
    assert {str(k) for k in s} >= STATS_KEYS, s
    assert all(isinstance(k, Atom) for k in s)
    for k in STATS_KEYS:
        assert isinstance(s[A(k)], int) and s[A(k)] >= 0, (k, s)
    assert s[A("generation")] == 7
    assert s[A("workers")] >= 2
    assert s[A("dicts")] == 0 and s[A("dict_keys")] == 0 and s[A("dict_bytes")] == 0


def test_python_threads_work(port):
    code = textwrap.dedent(
        """
        import threading
        out = []
        ts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]
        for t in ts: t.start()
        for t in ts: t.join(10)
        """
    )
    port.exec_ok(code)
    assert sorted(port.eval_ok("out")) == list(range(8))


def test_sys_executable_is_real_python(port):
    ver = port.eval_ok("list(__import__('sys').version_info[:2])")
    out = port.eval_ok(
        "__import__('subprocess').check_output([__import__('sys').executable, '-c',"
        " 'import sys; print(sys.version_info[0], sys.version_info[1])'])"
    )
    assert out.split() == [str(v).encode() for v in ver]


# --- the built-in `erlang` module ---------------------------------------------------------------


def test_erlang_is_builtin_even_with_erlang_py_on_path(port):
    import erlang as erlang_py  # the PyPI codec this suite uses: a top-level erlang.py

    shadow_dir = os.path.dirname(os.path.abspath(erlang_py.__file__))
    assert os.path.exists(os.path.join(shadow_dir, "erlang.py"))
    code = textwrap.dedent(
        """
        import sys, importlib, importlib.util
        sys.path.insert(0, shadow_dir)
        importlib.invalidate_caches()
        import erlang
        from erlang import SharedDict
        spec = importlib.util.spec_from_file_location('erlang_py_copy', shadow_dir + '/erlang.py')
        copy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copy)
        result = [
            erlang.__spec__.origin,
            hasattr(erlang, 'SharedDict'),
            hasattr(erlang, 'OtpErlangPid'),
            importlib.import_module('erlang') is erlang,
            hasattr(copy, 'OtpErlangPid'),
            'erlang' in sys.builtin_module_names,
        ]
        """
    )
    port.exec_ok(code, shadow_dir=shadow_dir)
    assert port.eval_ok("result") == [b"built-in", True, False, True, True, True]


def test_call_waits_for_a_module_another_worker_is_importing(port, tmp_path):
    """A call must not see a half-imported module: while one worker imports a slow module,
    a call into it from another owner waits for the import instead of failing with
    "partially initialized module" (the port looks modules up in sys.modules first)."""
    (tmp_path / "slow_import_mod.py").write_text(
        "import time\ntime.sleep(0.5)\n\ndef hello():\n    return 'imported'\n"
    )
    port.exec_ok("import sys; sys.path.insert(0, %r)" % str(tmp_path))
    first = port.call("slow_import_mod", "hello", owner=pid(101))
    second = port.call("slow_import_mod", "hello", owner=pid(102))
    assert port.ok(second) == b"imported"
    assert port.ok(first) == b"imported"
