#!/usr/bin/env python3
"""Draws the pyport benchmark chart from a results JSON written by pyport_bench.

usage: plot.py [RESULTS.json] [OUT.png]

Default input bench/results/latest.json. Default output: next to the input,
pyport_bench-<stamp>.png, and a copy as latest.png when the input is latest.json.
Four panels, medians over rounds with min..max as error bars:
  1. p50 latency vs number of concurrent callers (math.sqrt, sleep 1 ms), cat-port p50 line
  2. calls/s vs number of concurrent callers, cat-port sequential calls/s line
  3. payload cost per payload (ordered by ETF size): echo through Python, term_to_binary+binary_to_term, cat port
  4. worker-count sweep: 16 sleepers and 64 sqrt callers, calls/s vs workers
"""
import json
import os
import shutil
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def human_bytes(n):
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def main(argv):
    src = argv[1] if len(argv) > 1 else "bench/results/latest.json"
    with open(src) as f:
        doc = json.load(f)
    meta = doc["meta"]
    figs = {f["id"]: f for f in doc["figures"]}
    out_dir = os.path.dirname(src) or "."
    out = argv[2] if len(argv) > 2 else os.path.join(out_dir, f"pyport_bench-{meta['stamp']}.png")

    def series(ids):
        """(medians, lower error, upper error) for the figures that have data."""
        med, lo, hi, keep = [], [], [], []
        for i, fid in enumerate(ids):
            f = figs.get(fid)
            if f is None or f["median"] is None:
                continue
            med.append(f["median"])
            lo.append(f["median"] - f["min"])
            hi.append(f["max"] - f["median"])
            keep.append(i)
        return keep, med, [lo, hi]

    def hline(ax, fid, label, style):
        f = figs.get(fid)
        if f and f["median"] is not None:
            ax.axhline(f["median"], linestyle=style, color="grey", linewidth=1, label=label)

    conc = meta["concurrency"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    (a1, a2), (a3, a4) = axes

    # 1. latency vs concurrency
    for name, label, color in [("sqrt", "math.sqrt", "tab:blue"), ("sleep", "sleep 1 ms", "tab:orange")]:
        for pct, style, marker in [("p50", "-", "o"), ("p99", ":", "x")]:
            keep, med, err = series([f"c{name}{k}_{pct}_us" for k in conc])
            if med:
                a1.errorbar([conc[i] for i in keep], med, yerr=err, linestyle=style, marker=marker,
                            color=color, capsize=3, label=f"{label} {pct}")
    hline(a1, "cat_p50_us", "cat port p50 (pipe floor)", "--")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xticks(conc, [str(k) for k in conc])
    a1.set_xlabel("concurrent Erlang callers")
    a1.set_ylabel("latency per call (µs)")
    a1.set_title("Latency vs concurrency (default pool)")
    a1.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=8)

    # 2. throughput vs concurrency
    for name, label, color in [("sqrt", "math.sqrt", "tab:blue"), ("sleep", "sleep 1 ms", "tab:orange")]:
        keep, med, err = series([f"c{name}{k}_cps" for k in conc])
        if med:
            a2.errorbar([conc[i] for i in keep], med, yerr=err, marker="o", color=color, capsize=3,
                        label=label)
    hline(a2, "cat_alone_cps", "cat port alone, sequential", "--")
    f = figs.get("cat_alone_cps")
    if f and f["median"] is not None:
        a2.axhline(1.5 * f["median"], linestyle=":", color="tab:blue", linewidth=1,
                   label="target for 64 sqrt callers: 1.5x cat port")
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xticks(conc, [str(k) for k in conc])
    a2.set_xlabel("concurrent Erlang callers")
    a2.set_ylabel("calls/s (all callers)")
    a2.set_title("Throughput vs concurrency (default pool)")
    a2.grid(True, which="both", alpha=0.3)
    a2.legend(fontsize=8)

    # 3. payload cost vs size (payloads ordered by ETF size, one column each)
    pays = sorted(doc["payloads"], key=lambda p: p["etf_bytes"])
    xs = list(range(len(pays)))
    for off, prefix, label, color, marker in [
            (-0.15, "echo", "echo through Python (py:call)", "tab:red", "o"),
            (0.0, "t2b", "term_to_binary + binary_to_term", "tab:green", "s"),
            (0.15, "cat", "cat port, same frame size", "grey", "^")]:
        keep, med, err = series([f"{prefix}_{p['name']}_us" for p in pays])
        if med:
            a3.errorbar([xs[i] + off for i in keep], med, yerr=err, marker=marker,
                        linestyle="none", color=color, capsize=3, label=label)
    a3.set_xticks(xs, [f"{p['name']}\n{human_bytes(p['etf_bytes'])}" for p in pays], fontsize=8)
    a3.set_yscale("log")
    a3.set_xlabel("payload (ETF size)")
    a3.set_ylabel("p50 per round trip (µs)")
    a3.set_title("Payload cost vs size")
    a3.grid(True, which="both", alpha=0.3)
    a3.legend(fontsize=8)

    # 4. worker sweep
    sweep = meta["worker_sweep"]
    x = list(range(len(sweep)))
    width = 0.38
    for off, fid, label, color in [(-width / 2, "w{}_sleep16_cps", "sleep 1 ms, 16 callers", "tab:orange"),
                                   (width / 2, "w{}_sqrt64_cps", "math.sqrt, 64 callers", "tab:blue")]:
        keep, med, err = series([fid.format(n) for n in sweep])
        if med:
            a4.bar([x[i] + off for i in keep], med, width, yerr=err, capsize=3, color=color,
                   label=label)
    hline(a4, "cat_alone_cps", "cat port alone, sequential", "--")
    a4.set_yscale("log")
    a4.set_xticks(x, [str(n) for n in sweep])
    a4.set_xlabel("workers (workers = max_workers)")
    a4.set_ylabel("calls/s")
    a4.set_title("Worker-count sweep")
    a4.grid(True, axis="y", which="both", alpha=0.3)
    a4.legend(fontsize=8)

    commit = meta["commit"] + (" + uncommitted changes" if meta.get("dirty") else "")
    fig.suptitle(f"pyport benchmark — {meta['date']}, commit {commit}\n"
                 f"{meta['cpu']} ({meta['cores']} cores), OTP {meta['otp']}, Python {meta['python']}, "
                 f"{meta['rounds']} round(s), {'pinned to one CPU' if meta.get('pinned') else 'unpinned'}; points = medians, bars = min..max over rounds",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out, dpi=110)
    print(f"chart: {out}")
    if os.path.basename(src) == "latest.json" and len(argv) <= 2:
        latest = os.path.join(out_dir, "latest.png")
        shutil.copyfile(out, latest)
        print(f"chart: {latest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
