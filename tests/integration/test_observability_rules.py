"""The Prometheus bundle in observability/prometheus, checked by Prometheus's own tools:
promtool for the scrape configuration and the alert rules (and the rules' unit tests), and the
blackbox exporter for its module file."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.servers import ROOT

BUNDLE = ROOT / "observability" / "prometheus"
RULES = BUNDLE / "appliance-alerts.yml"
RULE_TESTS = BUNDLE / "appliance-alerts.test.yml"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    assert path, f"{name} is missing: install Debian's package (.ci/run does)"
    return path


def run(*argv: str, cwd: Path = BUNDLE) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_alert_rules_pass_promtool_check():
    done = run(tool("promtool"), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_alert_rules_pass_their_unit_tests():
    done = run(tool("promtool"), "test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_stays_quiet():
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for rule in alerts():
        name = rule["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"{name} is never seen firing"
        assert any(not case.get("exp_alerts") for case in mine), f"{name} is never seen quiet"


def test_every_alert_says_why_and_how_bad():
    for rule in alerts():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert len(rule["annotations"]["description"]) > 60, rule["alert"]


def test_kv_cache_alert_uses_the_current_metric_name():
    """vLLM renamed vllm:gpu_cache_usage_perc to vllm:kv_cache_usage_perc (PR 18354)."""
    rule = next(r for r in alerts() if r["alert"] == "ApplianceKVCacheNearlyFull")
    assert "vllm:kv_cache_usage_perc" in rule["expr"]
    assert "gpu_cache_usage_perc" not in rule["expr"]


def test_scrape_configuration_passes_promtool_and_loads_the_rules(tmp_path):
    shutil.copy(BUNDLE / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(RULES, tmp_path / "appliance-alerts.yml")
    shutil.copy(BUNDLE / "appliance-engines.json", tmp_path / "appliance-engines.json")
    done = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stdout + done.stderr  # e.g. a file_sd file it cannot find
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_scrape_configuration_scrapes_loopback_and_holds_no_secret():
    text = (BUNDLE / "prometheus.yml").read_text()
    config = yaml.safe_load(text)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"appliance-gateway", "vllm", "appliance-tls"}
    engines = json.loads((BUNDLE / "appliance-engines.json").read_text())
    assert jobs["vllm"]["file_sd_configs"] == [{"files": ["appliance-engines.json"]}]
    for job in jobs.values():
        groups = job.get("static_configs") or engines
        for target in (t for group in groups for t in group["targets"]):
            assert re.match(r"(https://)?127\.0\.0\.1[:/]", target), target
        assert not {"authorization", "basic_auth", "bearer_token", "bearer_token_file"} & set(job)
    assert not re.search(r"(?i)api[_-]?key\s*[:=]|bearer\s+\S", text)


def test_blackbox_module_passes_the_exporters_check():
    done = run(tool("prometheus-blackbox-exporter"), "--config.file=blackbox.yml",
               "--config.check")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("name", "port"), [("prometheus.default", "9090"),
                                             ("blackbox.default", "9115")])
def test_daemons_listen_on_loopback_only(name, port):
    args = (BUNDLE / name).read_text()
    assert f"--web.listen-address=127.0.0.1:{port}" in args


def test_prometheus_history_is_bounded():
    args = (BUNDLE / "prometheus.default").read_text()
    assert re.search(r"--storage\.tsdb\.retention\.time=\d+d", args)
    assert re.search(r"--storage\.tsdb\.retention\.size=\d+GB", args)


def test_cloudwatch_agents_scrape_configuration_passes_promtool():
    done = run(tool("promtool"), "check", "config", "appliance-prometheus.yaml",
               cwd=ROOT / "observability" / "cloudwatch")
    assert done.returncode == 0, done.stdout + done.stderr
