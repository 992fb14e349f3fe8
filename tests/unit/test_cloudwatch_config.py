"""observability/cloudwatch: the CloudWatch agent's configuration, checked against the agent's
documented schema (the agent itself cannot run here) and against the rest of the repository:
the units it reads exist, the log file is NGINX's, the scrape targets are the appliance's."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "observability" / "cloudwatch"
SCHEMA = json.loads(Path(__file__).with_name("cloudwatch_agent_schema.json").read_text())


def config() -> dict:
    return json.loads((BUNDLE / "amazon-cloudwatch-agent.json").read_text())


def test_configuration_matches_the_agents_schema():
    jsonschema.validate(config(), SCHEMA)


@pytest.mark.parametrize("mutation", [
    lambda c: c["logs"]["logs_collected"]["journald"]["collect_list"][0].pop("log_group_name"),
    lambda c: c["logs"]["logs_collected"]["files"]["collect_list"][0].pop("file_path"),
    lambda c: c["logs"]["logs_collected"]["files"]["collect_list"][0].update(
        retention_in_days=10),
    lambda c: c["logs"]["logs_collected"]["journald"]["collect_list"][0].update(
        priority="verbose"),
    lambda c: c["logs"].update(logs_colected={}),
])
def test_the_schema_check_refuses_what_the_agent_refuses(mutation):
    broken = config()
    mutation(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_journal_units_are_the_appliances():
    units = config()["logs"]["logs_collected"]["journald"]["collect_list"][0]["units"]
    shipped = {p.name for p in (ROOT / "systemd").glob("*.service")}
    # A template's instances are named one by one (the agent matches unit names exactly):
    # appliance-engine@0 to @15, a replica each of the models file's plan.
    instances = {u.replace("@.", f"@{i}.") for u in shipped if "@." in u for i in range(16)}
    assert {u for u in units if u.startswith("appliance-")} == {
        u for u in (shipped - {u for u in shipped if "@." in u}) | instances
        if u.startswith("appliance-")}
    assert "nginx.service" in units


def test_access_log_is_the_one_nginx_writes():
    files = config()["logs"]["logs_collected"]["files"]["collect_list"]
    site = (ROOT / "appliance_ops" / "render_site.py").read_text()
    default = re.search(r'access_log: str = "([^"]+)"', site).group(1)
    assert [f["file_path"] for f in files] == [default]


def test_prometheus_scrape_is_the_appliances_two_endpoints():
    prometheus = config()["logs"]["metrics_collected"]["prometheus"]
    path = Path(prometheus["prometheus_config_path"])
    scrape = yaml.safe_load((BUNDLE / path.name).read_text())
    ours = yaml.safe_load((ROOT / "observability" / "prometheus" / "prometheus.yml").read_text())
    def targets(job: dict) -> list[str]:
        """A job's static targets, or the name of the engines file first boot writes."""
        if "file_sd_configs" in job:
            return [Path(f).name for c in job["file_sd_configs"] for f in c["files"]]
        return job["static_configs"][0]["targets"]

    theirs = {j["job_name"]: targets(j) for j in scrape["scrape_configs"]}
    assert theirs == {j["job_name"]: targets(j)
                      for j in ours["scrape_configs"] if j["job_name"] != "appliance-tls"}
    assert theirs["vllm"] == ["appliance-engines.json"]
    vllm = next(j for j in scrape["scrape_configs"] if j["job_name"] == "vllm")
    engines = [Path(f) for c in vllm["file_sd_configs"] for f in c["files"]]
    assert [f.parent for f in engines] == [path.parent]  # where 65-observability.sh puts it
    for declaration in prometheus["emf_processor"]["metric_declaration"]:
        assert re.fullmatch(declaration["label_matcher"], "vllm") or re.fullmatch(
            declaration["label_matcher"], "appliance-gateway")
        for selector in declaration["metric_selectors"]:
            re.compile(selector)


def test_no_secret_or_credential_in_the_configuration():
    text = (BUNDLE / "amazon-cloudwatch-agent.json").read_text()
    assert not re.search(r"(?i)access_key|secret|role_arn|api_key|bearer", text)
