#!/usr/bin/env bash
# Runs the Common Test suites and prints a plain `N passed, N failed` line, which CI's test
# counter reads (it does not read ct_run's own summary). Exits with ct_run's status.
set -uo pipefail
logdir=$1; shift
out=$(mktemp)
ct_run -noshell -sname "pyport_ct_$$" -pa "$PWD/ebin" -dir ct_suites -logdir "$logdir" "$@" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
# One TEST COMPLETE line per suite when several -suite are given, one for a whole -dir.
lines=$(grep -E 'TEST COMPLETE' "$out")
sum() { grep -oE "[0-9]+ $1" <<<"$lines" | awk '{s += $1} END {print s + 0}'; }
passed=$(sum ok)
failed=$(sum failed)
skipped=$(sum skipped)
rm -f "$out"
if [ -z "$lines" ]; then
  echo "ct: no TEST COMPLETE line; ct_run exited $rc"
  echo "0 passed, 1 failed"
  exit $(( rc == 0 ? 1 : rc ))
fi
msg="$passed passed, $failed failed"
[ "$skipped" -gt 0 ] && msg="$msg, $skipped skipped"
echo "$msg"
exit "$rc"
