"""CPU tests of the benchmark plot tool (tools/plot_bench.py): which rows make one run, and the series it draws."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("plot_bench", os.path.join(ROOT, "tools", "plot_bench.py"))
plot_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_bench)


def row(op, impl, dtype, sms, us, date="2026-12-02T10:00:00Z", commit="abc1234"):
    return {"date": date, "card": "NVIDIA H200", "num_gpus": 2, "commit": commit, "op": op, "impl": impl,
            "dtype": dtype, "num_sms": sms, "us": us, "logical_gbps": 100.0 / us, "nvlink_gbps": 50.0 / us,
            "num_tokens": 4096, "hidden": 7168, "num_topk": 8, "num_experts": 256}


def test_select_run_takes_the_newest_run_or_the_commits():
    old = [row("dispatch", "openep", "bf16", s, 10.0 * s, date="2026-12-01T00:00:00Z", commit="old0000")
           for s in (8, 24)]
    new = [row("dispatch", "openep", "bf16", s, 5.0 * s) for s in (24, 4, 12)]
    ll = [row("ll_dispatch", "openep", "fp8", 0, 20.0, date="2026-12-03T00:00:00Z")]  # not normal mode: ignored
    run = plot_bench.select_run(old + new + ll)
    assert sorted(r["num_sms"] for r in run) == [4, 12, 24]
    assert [r["num_sms"] for r in plot_bench.select_run(old + new + ll, "old")] == [8, 24]
    with pytest.raises(SystemExit):
        plot_bench.select_run(old + new, "nosuchcommit")
    with pytest.raises(SystemExit):
        plot_bench.select_run(ll)


def test_series_sorts_by_sms_and_finds_the_nccl_row():
    run = [row("combine", "openep", "bf16", s, float(s)) for s in (24, 4, 8)] + [row("combine", "nccl", "bf16", 0, 7.0)]
    mine, nccl = plot_bench.series(run, "combine", "bf16")
    assert [m[0] for m in mine] == [4, 8, 24] and nccl["us"] == 7.0
    # FP8 dispatch is compared with NCCL's BF16 all-to-all row when there is no FP8 one
    run2 = [row("dispatch", "openep", "fp8", 8, 3.0), row("dispatch", "nccl", "bf16", 0, 9.0)]
    assert plot_bench.series(run2, "dispatch", "fp8")[1]["us"] == 9.0
    assert plot_bench.series(run2, "combine", "bf16") == ([], None)


def test_series_keeps_window_backed_rows_apart():
    run = [row("dispatch", "openep", "bf16", s, 2.0 * s) for s in (8, 4)]
    run += [row("dispatch", "openep-pool", "bf16", s, 1.0 * s) for s in (12, 4)]
    assert [m[1] for m in plot_bench.series(run, "dispatch", "bf16")[0]] == [8.0, 16.0]
    assert [m[0] for m in plot_bench.series(run, "dispatch", "bf16", "openep-pool")[0]] == [4, 12]


def test_load_rows_names_a_bad_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(row("dispatch", "openep", "bf16", 8, 1.0)) + "\n\nnot json\n")
    with pytest.raises(SystemExit) as e:
        plot_bench.load_rows(str(p))
    assert "r.jsonl:3" in str(e.value)


def test_plot_writes_a_png_where_matplotlib_exists(tmp_path):
    pytest.importorskip("matplotlib")
    p = tmp_path / "r.jsonl"
    rows = [row(op, "openep", dt, s, 1.0 + s) for op, dt in plot_bench.OPS for s in (4, 8, 12, 16, 24)]
    rows += [row(op, "nccl", "bf16", 0, 30.0) for op in ("dispatch", "combine")]
    rows += [row("dispatch", "openep-pool", dt, s, 0.5 + s) for dt in ("bf16", "fp8") for s in (4, 8, 12)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_bench.main([str(p), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
