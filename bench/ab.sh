#!/bin/sh
# A/B of the sequential py:call(math, sqrt, [2.0]) latency of two builds (for instance the
# commit before a change and the change, to show that something off by default costs nothing).
# Every run starts a fresh VM pinned to CPU 0 (taskset -c 0, port included) and the two builds
# alternate, so that both see the same machine over time. Prints each run, then the median
# p50 and p99 of each build and new/old.
#
#   bench/ab.sh OLD_EBIN OLD_BIN NEW_EBIN NEW_BIN [PAIRS=10] [CALLS=5000]
#
# OLD_EBIN / NEW_EBIN: directories with the pyport beams; OLD_BIN / NEW_BIN: port binaries.
# Needs _build/bench/ab_sqrt.beam (`make _build/bench/ab_sqrt.beam`).
set -eu
[ $# -ge 4 ] || { sed -n '2,10p' "$0" >&2; exit 2; }
old_ebin=$1 old_bin=$2 new_ebin=$3 new_bin=$4 pairs=${5:-10} calls=${6:-5000}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
run() {
    taskset -c 0 erl -noshell -pa "$2" -pa _build/bench \
        -eval "ab_sqrt:main([\"$3\", \"$calls\"])" | sed "s/^/$1 /"
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
{ if ($1 == "old") { o50[++no] = $2; o99[no] = $3 } else { n50[++nn] = $2; n99[nn] = $3 } }
END {
    mo50 = median(o50, no); mo99 = median(o99, no); mn50 = median(n50, nn); mn99 = median(n99, nn)
    printf "median of %d runs each: old p50 %.2f p99 %.2f us, new p50 %.2f p99 %.2f us\n", no, mo50, mo99, mn50, mn99
    printf "new/old: p50 %.3fx, p99 %.3fx\n", mn50 / mo50, mn99 / mo99
}' "$out"
