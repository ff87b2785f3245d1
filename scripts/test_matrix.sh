#!/usr/bin/env bash
# Builds pyport against every CPython 3.11+ on this machine and runs cargo test + pytest with
# each. Prints one line per interpreter and a summary; exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
candidates=()
for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/*/bin/python3 /usr/bin/python3.1[1-9] /usr/local/bin/python3.1[1-9]; do
  [ -x "$p" ] && candidates+=("$p")
done
run_one() {
  local py=$1 target=$2
  export PYO3_PYTHON="$py" CARGO_TARGET_DIR="$target"
  cargo test --release --locked -q 2>&1 | tail -n 3 || return 1
  cargo build --release --locked -q || return 1
  # Test packages go into a folder of our own: a distribution's Python is "externally
  # managed" (PEP 668) and refuses installs into its site-packages.
  local deps="$PWD/$target/pydeps"
  if ! PYTHONPATH="$deps" "$py" -c 'import pytest, erlang' 2>/dev/null; then
    "$py" -m pip install -q --disable-pip-version-check --target "$deps" pytest erlang-py 2>&1 | grep -v WARNING
    PYTHONPATH="$deps" "$py" -c 'import pytest, erlang' || return 1
  fi
  PYTHONPATH="$deps" PYPORT_BIN="$PWD/$target/release/pyport" "$py" -m pytest -q -p no:cacheprovider pytests 2>&1 | tail -n 1
}

declare -A seen
ran=(); failed=()
for py in "${candidates[@]}"; do
  real=$(readlink -f "$py")
  [ -n "${seen[$real]:-}" ] && continue
  seen[$real]=1
  ver=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]) if sys.version_info >= (3, 11) and __import__("sysconfig").get_config_var("Py_ENABLE_SHARED") else None' 2>/dev/null)
  if [ -z "$ver" ] || [ "$ver" = None ]; then
    echo "skip: $py (older than 3.11 or no shared libpython)"
    continue
  fi
  target="_build/matrix/$ver"
  echo "=== Python $ver ($py)"
  if run_one "$py" "$target"; then ran+=("$ver"); else failed+=("$ver"); fi
done
echo "test-matrix: passed on: ${ran[*]:-none}; failed on: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
