#!/usr/bin/env bash
# Usage: build_port.sh TARGET_DIR PYTHON [--test [CARGO TEST ARGS...]]
# Builds the port program into priv/: the extension module with cargo (in TARGET_DIR, a cargo
# target folder that several projects may share), the launcher with PYTHON as its default
# interpreter. cargo's lines are shown as they come (a first build takes minutes). Says what
# to install when cargo is missing. Run by `make port` (and so by rebar3's and mix's builds).
# With --test: runs `cargo test --release --locked ARGS` instead, under the same guard.
set -euo pipefail
target=$1 python=$2
shift 2
mode=build
if [ "${1:-}" = --test ]; then mode=test; shift; fi
cargo=${CARGO:-cargo}
if ! command -v "$cargo" >/dev/null 2>&1; then
  # printf, a builtin: this must work with little else on PATH.
  printf '%s\n' >&2 \
    "pyport: building the port program needs Rust's cargo, and there is no \`$cargo' on PATH." \
    "Install Rust with rustup (https://rustup.rs):" \
    "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh     (then: . ~/.cargo/env)" \
    "or from the OS packages (Debian/Ubuntu: sudo apt-get install cargo; Fedora: sudo dnf install cargo)," \
    "and build again."
  exit 1
fi
if [ -z "$python" ] || ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "pyport: building needs a Python 3.11 or later (found: ${python:-none}); set PYTHON=/path/to/python3" >&2
  exit 1
fi
mkdir -p "$target" priv
export CARGO_TARGET_DIR=$target PYO3_PYTHON=$python
# Projects that share the target folder build and copy one at a time, so that none copies
# another's module (cargo's own lock covers only the build).
exec 9>"$target/.pyport-build.lock"
if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
  echo "pyport: waiting for another pyport build in $target"
  flock 9
fi
# cargo decides that pyport's own crate is up to date from file times, which says nothing in a
# folder shared with other copies of pyport (other projects, other versions): a copy checked
# out after another's build looks newer, one checked out before looks built. So a hash of the
# sources and of what else goes into the build decides: when it names the last build here,
# there is nothing to do; otherwise pyport's own artifacts go and cargo rebuilds that crate
# (the dependencies stay).
sources=$( { cat Cargo.toml Cargo.lock build.rs .cargo/config.toml $(find src -type f | LC_ALL=C sort)
             "$cargo" --version; rustc --version 2>/dev/null || true
             echo "$python ${RUSTFLAGS:-} ${CARGO_ENCODED_RUSTFLAGS:-}"; } | sha256sum | cut -c1-64)
# The test binaries have a stamp of their own: a build of the module alone leaves the test
# binaries of the last `cargo test` in place, and cargo would run another copy's tests.
core=$target/release/libpyport_core.so
stamp=$target/.pyport-sources
[ "$mode" = test ] && stamp=$target/.pyport-test-sources
last=$(cat "$stamp" 2>/dev/null || true)
if [ "$last" != "$sources" ]; then
  "$cargo" clean --release --quiet -p pyport 2>/dev/null || true
  rm -f "$target/.pyport-sources" "$target/.pyport-test-sources"
fi
if [ "$mode" = test ]; then
  "$cargo" test --release --locked "$@"
  echo "$sources" > "$stamp"
  exit 0
fi
t0=$(date +%s)
if [ "$last" = "$sources" ] && [ -f "$core" ]; then
  echo "pyport: the port program is up to date (built from these sources in $target)"
else
  echo "pyport: building the port program with cargo in $target (a first build takes a few minutes; Rust's dependencies are reused from then on, by other projects sharing the folder too)"
  set +e
  "$cargo" build --release --locked 2>&1 | grep --line-buffered -v '^ *Fresh'
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    echo "pyport: cargo build failed (exit status $status); see its messages above" >&2
    exit "$status"
  fi
  echo "$sources" > "$target/.pyport-sources"
fi
core=$target/release/libpyport_core.so
cmp -s "$core" priv/pyport_core.abi3.so || { cp "$core" priv/pyport_core.abi3.so.tmp && mv -f priv/pyport_core.abi3.so.tmp priv/pyport_core.abi3.so; }
sed "s|@PYTHON@|$python|" scripts/launcher.sh > priv/pyport.tmp && chmod 755 priv/pyport.tmp
if cmp -s priv/pyport.tmp priv/pyport; then rm -f priv/pyport.tmp; else mv -f priv/pyport.tmp priv/pyport; fi
echo "$python" > priv/pyport.python
echo "pyport: port program ready in priv/ ($(( $(date +%s) - t0 )) s)"
