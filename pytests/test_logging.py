"""Python's `logging` at wire level: the root logger's level at start (`--python-log-level`),
and `{configure_logging, Id, Level, Format}`, which sets it and the format of the records
forwarded as `pyport_log_record` frames."""

from conftest import A


def messages(port):
    return [r[-1] for r in port.log_records]


def test_root_level_at_start_follows_the_flag(port_factory):
    port = port_factory(["--python-log-level", "20"])
    port.exec_ok("import logging\nlogging.debug('d')\nlogging.info('i')")
    port.exec_ok("pass")  # a round trip after the records
    assert messages(port) == [b"i"]


def test_default_root_level_is_warning(port):
    port.exec_ok("import logging\nlogging.info('i')\nlogging.warning('w')")
    port.exec_ok("pass")
    assert messages(port) == [b"w"]


def test_configure_logging_sets_level_and_format(port):
    rid = port.new_id()
    port.send((A("configure_logging"), rid, 10, b"%(levelname)s:%(message)s"))
    port.ok(rid)
    port.exec_ok("import logging\nlogging.debug('d')")
    port.exec_ok("pass")
    assert messages(port) == [b"DEBUG:d"]
    rid = port.new_id()
    port.send((A("configure_logging"), rid, 40, A("undefined")))
    port.ok(rid)
    port.exec_ok("import logging\nlogging.warning('w')\nlogging.error('e')")
    port.exec_ok("pass")
    assert messages(port)[-1] == b"e" and b"w" not in messages(port)


def test_a_format_python_refuses_is_its_error(port):
    rid = port.new_id()
    port.send((A("configure_logging"), rid, 10, b"%(bogus"))
    reason = port.err(rid)
    assert reason[0] == "python" and reason[1] == "ValueError", reason
