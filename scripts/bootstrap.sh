#!/usr/bin/env bash
# Installs what `make test` needs on a fresh Debian machine that has Rust and Python:
# Erlang/OTP with common_test and dialyzer (OS packages) and the Python test packages (PyPI).
set -euo pipefail
PYTHON=${1:-python3}

need_erlang=0
for tool in erl erlc ct_run dialyzer; do
  command -v "$tool" >/dev/null 2>&1 || need_erlang=1
done
if [ "$need_erlang" = 1 ]; then
  echo "bootstrap: installing Erlang/OTP from the OS packages"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    erlang-nox erlang-dev erlang-common-test erlang-eunit erlang-dialyzer >/dev/null
fi

if ! "$PYTHON" -c 'import pytest, erlang' >/dev/null 2>&1; then
  echo "bootstrap: installing Python test packages (pytest, erlang-py)"
  "$PYTHON" -m pip install -q --disable-pip-version-check pytest erlang-py
fi
echo "bootstrap: ok ($("$PYTHON" --version), OTP $(erl -noshell -eval 'io:put_chars(erlang:system_info(otp_release)), halt().'))"
