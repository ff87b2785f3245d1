#!/usr/bin/env bash
# cargo-mutants over the port program's Rust code, one mutant at a time (2 shared cores).
#   FILES="src/a.rs src/b.rs"  those files
#   otherwise                  the Rust lines changed since `git merge-base $MUTANTS_BASE HEAD`
#                              (MUTANTS_BASE defaults to main): what a change must account for
# Settings (timeout floor, release profile, test code excluded) are in .cargo/mutants.toml.
# Results: the summary line, and _build/mutants/cargo/mutants.out/{caught,missed,timeout,unviable}.txt
set -euo pipefail
cd "$(dirname "$0")/.."
out=_build/mutants/cargo
mkdir -p "$out"
command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants
rm -rf "$out/mutants.out" "$out/mutants.out.old"
# --gitignore: the scratch copy leaves out target/ and _build/ (test logs, whatever they hold).
args=(mutants --jobs 1 --gitignore true --output "$out")
if [ -n "${FILES:-}" ]; then
  for f in $FILES; do args+=(--file "$f"); done
  echo "cargo-mutants over: $FILES"
else
  base=$(git merge-base "${MUTANTS_BASE:-main}" HEAD)
  git diff "$base" -- src > "$out/diff"
  if [ ! -s "$out/diff" ]; then
    echo "cargo-mutants: no Rust change since ${MUTANTS_BASE:-main} ($base); nothing to mutate"
    exit 0
  fi
  args+=(--in-diff "$out/diff")
  echo "cargo-mutants over the Rust lines changed since ${MUTANTS_BASE:-main} ($base)"
fi
# The fuzz test runs FUZZ_SECONDS (60 by default) in every `cargo test`: 5 s per mutant here.
rc=0
FUZZ_SECONDS=${FUZZ_SECONDS:-5} nice -n 10 cargo "${args[@]}" || rc=$?
for kind in caught missed timeout unviable; do
  f="$out/mutants.out/$kind.txt"
  [ -f "$f" ] && printf '%-8s %s\n' "$kind" "$(wc -l < "$f")"
done
# cargo-mutants exits 2 when some mutants were missed, 3 on timeouts: passed on.
exit "$rc"
