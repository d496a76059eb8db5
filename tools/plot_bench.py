#!/usr/bin/env python3
"""Plot OpenEP's normal-mode SM sweep from the benchmark's JSON lines (bench/openep_bench --results FILE.jsonl).

    python3 tools/plot_bench.py RESULTS.jsonl [--commit SHA] [--out PNG]

Takes the rows of one run (the given commit, else the newest run in the file: its latest date), and draws one
column per operation (dispatch BF16, dispatch FP8, combine BF16): time (us) against SMs above, GB/s (logical and
NVLink) against SMs below, OpenEP as lines over its SM sweep and NCCL's all-to-all of the same bytes as a
horizontal line (its SM count is NCCL's own). The title names card, GPU count, commit and date: compare numbers
only within one such plot. Writes PNG (default: next to RESULTS, `<stem>_<commit>.png`) and prints its path.

Needs matplotlib (present on the GPU machines' image; a tool's dependency, not the library's): without it the
script says so and exits 3.
"""
import argparse
import json
import os
import sys

OPS = [("dispatch", "bf16"), ("dispatch", "fp8"), ("combine", "bf16")]


def load_rows(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"plot_bench: {path}:{n}: not a JSON line ({e})")
    return rows


def select_run(rows, commit=None):
    """The rows of one run of the normal-mode benchmark: `commit`'s newest date, else the newest date overall."""
    normal = [r for r in rows if (r.get("op"), r.get("dtype")) in OPS and "us" in r and "date" in r]
    if commit:
        normal = [r for r in normal if str(r.get("commit", "")).startswith(commit)]
    if not normal:
        raise SystemExit("plot_bench: no normal-mode dispatch/combine rows" + (f" for commit {commit}" if commit else ""))
    date = max(r["date"] for r in normal)
    return [r for r in normal if r["date"] == date]


def series(run, op, dtype, impl="openep"):
    """(OpenEP [(sms, us, logical GB/s, NVLink GB/s)] sorted by SMs, NCCL row or None) of one operation; impl
    "openep-pool" gives the window-backed-output rows (openep_bench --pool)."""
    mine = sorted((r["num_sms"], r["us"], r.get("logical_gbps"), r.get("nvlink_gbps")) for r in run
                  if r["op"] == op and r["dtype"] == dtype and r["impl"] == impl)
    nccl = [r for r in run if r["op"] == op and r["impl"] == "nccl" and r["dtype"] in (dtype, "bf16")]
    return mine, (nccl[0] if nccl else None)


def plot(run, out_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_bench: matplotlib is not installed; no plot written", file=sys.stderr)
        sys.exit(3)
    first = run[0]
    fig, axes = plt.subplots(2, len(OPS), figsize=(5 * len(OPS), 7.5), squeeze=False)
    for col, (op, dtype) in enumerate(OPS):
        mine, nccl = series(run, op, dtype)
        top, bottom = axes[0][col], axes[1][col]
        top.set_title(f"{op} {dtype.upper()}")
        if mine:
            sms = [m[0] for m in mine]
            top.plot(sms, [m[1] for m in mine], "o-", label="OpenEP")
            bottom.plot(sms, [m[2] for m in mine], "o-", label="OpenEP logical")
            bottom.plot(sms, [m[3] for m in mine], "s--", label="OpenEP NVLink")
            top.set_xticks(sms)
            bottom.set_xticks(sms)
        pooled, _ = series(run, op, dtype, "openep-pool")
        if pooled:
            sms = [m[0] for m in pooled]
            top.plot(sms, [m[1] for m in pooled], "^-", label="OpenEP, window-backed outputs")
            bottom.plot(sms, [m[3] for m in pooled], "^--", label="OpenEP window-backed NVLink")
        if nccl is not None:
            top.axhline(nccl["us"], color="gray", linestyle=":", label="NCCL all-to-all")
            if nccl.get("logical_gbps") is not None:
                bottom.axhline(nccl["logical_gbps"], color="gray", linestyle=":", label="NCCL logical")
        top.set_ylabel("us (lower is better)")
        bottom.set_ylabel("GB/s per rank")
        bottom.set_xlabel("SMs")
        top.set_ylim(bottom=0)
        bottom.set_ylim(bottom=0)
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    fig.suptitle(f"OpenEP normal mode, {first.get('num_gpus', '?')} x {first.get('card', '?')}, "
                 f"{first.get('num_tokens', '?')} tokens x hidden {first.get('hidden', '?')}, "
                 f"top-{first.get('num_topk', '?')} of {first.get('num_experts', '?')}; "
                 f"commit {first.get('commit', '?')}, {first['date']}")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    run = select_run(load_rows(args.results), args.commit)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.results)),
                                   f"{os.path.splitext(os.path.basename(args.results))[0]}_"
                                   f"{run[0].get('commit', 'unknown')}.png")
    plot(run, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
