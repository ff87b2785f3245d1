#!/usr/bin/env bash
# Usage: snapshot.sh CHECKOUT WORK
# Copies the checkout's files as they are now (tracked and untracked, not ignored: no
# target/, _build/, priv/pyport) into WORK/pyport-src, commits them on branch main and makes
# the bare clone WORK/pyport.git that sample projects name as their git dependency.
set -euo pipefail
src=$1; work=$2
mkdir -p "$work/pyport-src"
cd "$src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$work/pyport-src"
cd "$work/pyport-src"
git init -q -b main
git add -A
git -c user.name=pyport-test -c user.email=test@pyport.invalid commit -q -m snapshot
git clone -q --bare "$work/pyport-src" "$work/pyport.git"
