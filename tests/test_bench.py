"""The benchmarks still run: each one once at a tiny size. Their figures come from bench/run;
here only that they finish and that what they check holds."""

import subprocess
import sys

from tests.kit import ROOT, require_mysql


def bench(*args):
    require_mysql().close()
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_storm_benchmark_runs():
    out = bench("bench.storm", "--groups", "30", "--per-group", "5", "--window", "2")
    assert "| alerts missing from delivered messages | 0 | 0 |" in out
    assert "| 410100/130101 answers | 0 | 0 |" in out


def test_storm_benchmark_runs_through_feishu_and_wecom():
    for kind, codes in (("feishu", "11232/99991400"), ("wecom", "45009")):
        out = bench("bench.storm", "--groups", "30", "--per-group", "5", "--window", "2",
                    "--kind", kind)
        assert "| alerts missing from delivered messages | 0 | 0 |" in out, kind
        assert f"| {codes} answers | 0 | 0 |" in out, kind


def test_intake_benchmark_runs():
    out = bench("bench.intake", "--rate", "50", "--seconds", "1", "--connections", "4")
    assert "alertbridge (journal_sync=full)" in out and "synchronous baseline" in out


def test_grafana_queries_benchmark_runs():
    out = bench(
        "bench.grafana_queries",
        "--rows",
        "2000",
        "--dsn",
        "root:@127.0.0.1:3306/alertbridge_bench_smoke",
    )
    assert "Latest 100 alert records" in out


def test_status_page_benchmark_runs():
    out = bench("bench.status_page", "--webhooks", "200", "--loads", "3")
    assert "| GET / (status) |" in out and "200 alerts firing in MariaDB" in out


def test_oncall_benchmark_runs():
    out = bench("bench.oncall", "--incidents", "300", "--loads", "6")
    assert "300 open incidents in MariaDB" in out and "(steps: 100, messages journaled: 1)" in out
    assert "| all 300 steps taken (marked done, each with its note) |" in out
    assert "| POST /incident/TOKEN, a claim (3 claims) |" in out
