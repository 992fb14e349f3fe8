"""`make bench` and `make soak` in a tiny mode: the scripts run end to end and report.

Their figures are not checked here (speed targets are for the scripts to print, never for a
test to time); what is checked is behaviour: no errors under the benchmark's load, and the
soak's accounting, rate limits and upstream aborts.
"""

import csv
import subprocess
import sys

from tests.servers import ROOT


def test_bench_compare_runs_and_counts_no_errors(tmp_path):
    run = subprocess.run([sys.executable, "bench/bench_compare.py", "--duration", "1",
                          "--concurrency", "1", "64", "--skip", "nginx+tls", "litellm",
                          "--no-plot", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = list(csv.DictReader((tmp_path / "bench_compare.csv").open()))
    assert {(r["contender"], r["concurrency"]) for r in rows} == {
        (name, c) for name in ("direct", "proxy", "vllm-router") for c in ("1", "64")}
    assert all(int(r["errors"]) == 0 and float(r["rps"]) > 0 for r in rows), rows
    streams = list(csv.DictReader((tmp_path / "bench_streams.csv").open()))
    assert [int(s["stream_errors"]) for s in streams] == [0, 0, 0]
    assert "vllm-router:" in run.stdout and "proxy CPU per request" in run.stdout


def test_soak_runs_and_passes_its_behaviour_checks(tmp_path):
    run = subprocess.run([sys.executable, "bench/soak.py", "--minutes", "0.1", "--csv",
                          str(tmp_path / "soak.csv")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = run.stdout
    for check in ("no 5xx but the deliberate ones", "rate limits refused the keys over them",
                  "key store usage equals what the engine reported",
                  "every aborted stream aborted upstream",
                  "streams left mid-way are billed between what was read and what was generated"):
        assert f"PASS  {check}" in out, out + run.stderr
    # Growth and leaks need minutes to mean anything: here only that they are measured.
    assert "proxy RSS growth" in out and "file descriptors" in out
    assert (tmp_path / "soak.csv").read_text().startswith("t_s,rss_mb,fds,requests")


def test_bench_workers_runs_every_worker_count_without_errors(tmp_path):
    run = subprocess.run([sys.executable, "bench/bench_workers.py", "--workers", "1", "2",
                          "--duration", "1", "--keys", "8", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = list(csv.DictReader((tmp_path / "bench_workers.csv").open()))
    assert [r["contender"] for r in rows] == ["direct", "1 worker", "2 workers"]
    assert all(int(r["errors"]) == 0 and float(r["rps"]) > 0 for r in rows), rows


def test_bench_gateway_code_drives_the_gateway_to_200s_and_reports_both_costs():
    run = subprocess.run([sys.executable, "bench/bench_gateway_code.py", "--requests", "300",
                          "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "us a small request" in run.stdout and "us a streamed event" in run.stdout
