#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a fresh Debian machine that has Rust and
# Python: Erlang/OTP with common_test and dialyzer, PropEr (the property-based SharedDict
# suite), rebar3 and Elixir (for the sample projects of the tests) from the OS packages; the Python test packages, numpy and uv
# (which builds declared Python environments fast; pyport finds it next to the interpreter) from PyPI.
# Only what is missing is installed.
#
#   bootstrap.sh [PYTHON]          install what is missing
#   bootstrap.sh --check [PYTHON]  install nothing; list what is missing, exit 1 if anything is
set -euo pipefail
check_only=0
if [ "${1:-}" = "--check" ]; then check_only=1; shift; fi
PYTHON=${1:-python3}

missing_os=()
for tool in erl erlc ct_run dialyzer; do
  command -v "$tool" >/dev/null 2>&1 || missing_os+=(erlang-nox erlang-dev erlang-common-test erlang-eunit erlang-dialyzer)
done
command -v rebar3 >/dev/null 2>&1 || missing_os+=(rebar3)
# PropEr: Debian installs it into the OTP lib dir, where ct_run's code path finds it. Asked of
# erl itself (about 0.2 s), since no command names it.
if command -v erl >/dev/null 2>&1; then
  [ "$(erl -noshell -eval 'io:format("~p", [code:which(proper)]), halt().' 2>/dev/null)" != non_existing ] \
    || missing_os+=(erlang-proper)
else
  missing_os+=(erlang-proper)
fi
command -v elixir >/dev/null 2>&1 && command -v mix >/dev/null 2>&1 || missing_os+=(elixir)
missing_os=($(printf '%s\n' "${missing_os[@]}" | sort -u))

# One interpreter start, and find_spec rather than import: the check stays quick.
missing_py=($("$PYTHON" -c '
import importlib.util as u
for mod, pkg in (("pytest", "pytest"), ("erlang", "erlang-py"), ("numpy", "numpy"), ("uv", "uv")):
    if u.find_spec(mod) is None:
        print(pkg)
'))

if [ "$check_only" = 1 ]; then
  if [ ${#missing_os[@]} -eq 0 ] && [ ${#missing_py[@]} -eq 0 ]; then exit 0; fi
  echo "bootstrap: missing OS packages: ${missing_os[*]:-none}; Python packages: ${missing_py[*]:-none}" >&2
  exit 1
fi

if [ ${#missing_os[@]} -gt 0 ]; then
  echo "bootstrap: installing OS packages: ${missing_os[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing_os[@]}" >/dev/null
fi
if [ ${#missing_py[@]} -gt 0 ]; then
  echo "bootstrap: installing Python packages: ${missing_py[*]}"
  "$PYTHON" -m pip install -q --disable-pip-version-check "${missing_py[@]}"
fi
echo "bootstrap: ok ($("$PYTHON" --version), OTP $(erl -noshell -eval 'io:put_chars(erlang:system_info(otp_release)), halt().'), $(rebar3 version | cut -d' ' -f1-2), Elixir $(elixir -e 'IO.write(System.version())'))"
