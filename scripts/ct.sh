#!/usr/bin/env bash
# Runs the Common Test suites and prints a plain `N passed, N failed` line, which CI's test
# counter reads (it does not read ct_run's own summary). Exits with ct_run's status.
set -uo pipefail
logdir=$1; shift
out=$(mktemp)
ct_run -noshell -sname "pyport_ct_$$" -pa "$PWD/ebin" -dir ct_suites -logdir "$logdir" "$@" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
line=$(grep -E 'TEST COMPLETE' "$out" | tail -n 1)
passed=$(sed -nE 's/.* ([0-9]+) ok.*/\1/p' <<<"$line")
failed=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$line")
skipped=$(sed -nE 's/.* ([0-9]+) skipped.*/\1/p' <<<"$line")
auto_skipped=$(grep -oE '[0-9]+ \(auto\)' <<<"$line" | grep -oE '[0-9]+' || true)
rm -f "$out"
if [ -z "$line" ]; then
  echo "ct: no TEST COMPLETE line; ct_run exited $rc"
  echo "0 passed, 1 failed"
  exit $(( rc == 0 ? 1 : rc ))
fi
msg="${passed:-0} passed, ${failed:-0} failed"
[ -n "${skipped}${auto_skipped}" ] && msg="$msg, ${skipped:-${auto_skipped}} skipped"
echo "$msg"
exit "$rc"
