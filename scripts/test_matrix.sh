#!/usr/bin/env bash
# Runs the wire-protocol tests (pytest) with the one build of the port program (priv/pyport)
# running in every CPython 3.11+ on this machine (PYPORT_PYTHON): the extension module is
# built for the stable ABI, so nothing is rebuilt. pytest itself runs in the build's Python.
# Prints one line per interpreter and a summary; exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
candidates=()
for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/*/bin/python3 /usr/bin/python3.1[1-9] /usr/local/bin/python3.1[1-9]; do
  [ -x "$p" ] && candidates+=("$p")
done
declare -A seen
ran=(); failed=()
for py in "${candidates[@]}"; do
  real=$(readlink -f "$py")
  [ -n "${seen[$real]:-}" ] && continue
  seen[$real]=1
  ver=$("$py" -c 'import sys, sysconfig; print("%d.%d.%d" % sys.version_info[:3]) if sys.version_info >= (3, 11) and sys.implementation.name == "cpython" and not sysconfig.get_config_var("Py_GIL_DISABLED") else print("no")' 2>/dev/null)
  if [ -z "$ver" ] || [ "$ver" = no ]; then
    echo "skip: $py (not a CPython 3.11+ with the GIL)"
    continue
  fi
  echo "=== Python $ver ($py)"
  if PYPORT_PYTHON="$py" PYPORT_BIN="$PWD/priv/pyport" "$python" -m pytest -q -p no:cacheprovider pytests 2>&1 | tail -n 3; then
    ran+=("$ver")
  else
    failed+=("$ver")
  fi
done
echo "test-matrix: passed on: ${ran[*]:-none}; failed on: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
