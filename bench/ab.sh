#!/bin/sh
# A/B of the sequential py:call(math, sqrt, [2.0]) latency of two builds (for instance the
# commit before a change and the change, to show that something off by default costs nothing).
# Every run starts a fresh VM pinned to CPU 0 (taskset -c 0, port included) and the two builds
# alternate, so that both see the same machine over time. Prints each run (p50 p99 p10 mean, us),
# then the median over runs of each of these per build, and new/old. Pinned with one worker the
# latency can be bimodal (a fast and a slow mode): compare p10 and the mean too, not p50 alone.
#
#   bench/ab.sh OLD_EBIN OLD_BIN NEW_EBIN NEW_BIN [PAIRS=10] [CALLS=5000] [CASE=sqrt]
#
# CASE: sqrt (py:call(math, sqrt, [2.0])), map_100 (echo of a 100-entry map) or sd_get_cached
# (a SharedDict get from the read cache); CASE+elixir with the app env elixir true.
# OLD_EBIN / NEW_EBIN: directories with the pyport beams; OLD_BIN / NEW_BIN: port binaries.
# Needs _build/bench/ab_sqrt.beam (`make _build/bench/ab_sqrt.beam`).
set -eu
[ $# -ge 4 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
old_ebin=$1 old_bin=$2 new_ebin=$3 new_bin=$4 pairs=${5:-10} calls=${6:-5000} case=${7:-sqrt}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
run() {
    taskset -c 0 erl -noshell -pa "$2" -pa _build/bench \
        -eval "ab_sqrt:main([\"$3\", \"$calls\", \"$case\"])" | sed "s/^/$1 /"
}
i=0
while [ "$i" -lt "$pairs" ]; do
    # Alternate which build goes first, so that neither always follows the other.
    if [ $((i % 2)) -eq 0 ]; then
        run old "$old_ebin" "$old_bin"; run new "$new_ebin" "$new_bin"
    else
        run new "$new_ebin" "$new_bin"; run old "$old_ebin" "$old_bin"
    fi
    i=$((i + 1))
done | tee "$out"
awk '
function median(a, n,   i, j, t) {
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j+1] = a[j]; a[j+1] = t }
    return n % 2 ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
}
{ if ($1 == "old") { n = ++no; for (k = 2; k <= 5; k++) o[k, n] = $k }
  else { n = ++nn; for (k = 2; k <= 5; k++) w[k, n] = $k } }
END {
    # Run i of each build ran next to each other (pair i): the median of the per-pair
    # ratios is robust to the machine changing speed between pairs.
    split("p50 p99 p10 mean", name, " ")
    for (k = 2; k <= 5; k++) {
        for (i = 1; i <= no; i++) a[i] = o[k, i]; mo = median(a, no)
        for (i = 1; i <= nn; i++) b[i] = w[k, i]; mn = median(b, nn)
        for (i = 1; i <= no; i++) r[i] = w[k, i] / o[k, i]; mr = median(r, no)
        printf "%-4s median of %d runs: old %.2f us, new %.2f us; median of per-pair new/old %.3fx\n", name[k-1], no, mo, mn, mr
    }
}' "$out"
