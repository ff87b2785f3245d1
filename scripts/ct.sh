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
rm -f "$out"
# ct_run -noshell does not say which case failed: name each failed case and the start of its
# reason here, from this run's suite.log, so a red CI log shows the cause in its last lines.
run=$(ls -td "$logdir"/ct_run.* 2>/dev/null | head -1)
if [ -n "$run" ]; then
  find "$run" -name suite.log -exec awk '
    /^=case/ { c = $2 }
    /^=result/ { if ($2 ~ /^(failed|auto_skipped|skipped)/) { print "FAILED " c ": " substr($0, 16); n = 6 } else n = 0; next }
    /^=/ { n = 0 }
    n > 0 { print "    " $0; n-- }
  ' {} + | head -80
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
