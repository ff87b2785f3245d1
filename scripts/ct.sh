#!/usr/bin/env bash
# Runs the Common Test suites and prints a plain `N passed, N failed` line, which CI's test
# counter reads (it does not read ct_run's own summary). Exits with ct_run's status, or 1 when
# any case was skipped: every case pins a documented promise, so a skipped case (a `{skip, _}`
# return, or the auto-skip after a failed init_per_suite) is a promise left unchecked.
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
# ct_run's per-case verdicts scroll far up in a long log: repeat each failed case and its
# reason here, next to the count, so a red run names its cause in the last lines.
fails=$(grep -A6 -E '^%%% .* ==> .*: FAILED' "$out" | head -80)
rm -f "$out"
if [ -n "$fails" ]; then
  echo "---- failed cases ----"
  echo "$fails"
  echo "----------------------"
fi
if [ -z "$lines" ]; then
  echo "ct: no TEST COMPLETE line; ct_run exited $rc"
  echo "0 passed, 1 failed"
  exit $(( rc == 0 ? 1 : rc ))
fi
msg="$passed passed, $failed failed"
if [ "$skipped" -gt 0 ]; then
  msg="$msg, $skipped skipped (a skip counts as a failure)"
  [ "$rc" -eq 0 ] && rc=1
fi
echo "$msg"
exit "$rc"
