#!/bin/sh
# pyport's port program (installed as priv/pyport by `make port`, from scripts/launcher.sh).
#
# The port is a Python interpreter running pyport's extension module pyport_core.abi3.so,
# which lies next to this file: $PYPORT_PYTHON (the Erlang side sets it from the app env
# `python'), else the interpreter the build used. Any CPython 3.11 or later will do.
#   -P  the working directory is not put on sys.path
#   -u  unbuffered output: what is written just before a crash still reaches the log
# The protocol moves to fds 3 (input) and 4 (output) before Python starts: its stdin is
# /dev/null and its stdout the port's stderr, so nothing printed during start-up (a .pth file,
# sitecustomize) can reach the protocol; pyport_core then captures fds 1 and 2 itself.
# SIGINT is ignored (a Ctrl-C in the Erlang shell's terminal must not stop Python), so Python
# installs no handler of its own for it. The -c code loads the module by its path and binds
# no name in __main__; its main() never returns.
case $0 in */*) here=${0%/*} ;; *) here=. ;; esac
python=${PYPORT_PYTHON:-@PYTHON@}
trap '' INT
exec "$python" -P -u -c "(lambda u: (lambda s: (lambda m: (s.loader.exec_module(m), m.main(__import__('sys').argv[2:])))(u.module_from_spec(s)))(u.spec_from_file_location('pyport_core', __import__('sys').argv[1])))(__import__('importlib.util').util)" "$here/pyport_core.abi3.so" "$@" \
  3<&0 4>&1 0</dev/null 1>&2
