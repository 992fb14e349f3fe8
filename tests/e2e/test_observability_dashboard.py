"""The Grafana dashboard and the alert rules against a real Prometheus (Debian's) scraping a
real stack: vLLM (CPU build, tiny model), the gateway, and NGINX probed by the blackbox
exporter. Every panel's query must parse and return at least one series after some traffic, so
a metric vLLM renames fails here rather than leaving an empty panel in production.
"""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml

from tests.e2e.engine_stack import SERVED_NAME
from tests.integration.nginx_stack import render, serving
from tests.integration.proxy_stack import gateway
from tests.integration.test_observability_rules import BUNDLE, RULES, alerts, tool
from tests.servers import ROOT, free_port, running

DASHBOARD = ROOT / "observability" / "grafana" / "inference-appliance.json"
RATE_INTERVAL = "1m"
SCRAPE_INTERVAL_S = 1


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"]
            for target in panel.get("targets", [])]


def scrape_config(gateway: str, site: str, blackbox: str) -> dict:
    """The shipped prometheus.yml with this stack's loopback ports in place of the host's (the
    engine's are in ``appliance-engines.json`` beside it, as first boot writes it)."""
    config = yaml.safe_load((BUNDLE / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                         "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["appliance-gateway"]["static_configs"][0]["targets"] = [gateway]
    jobs["appliance-tls"]["static_configs"][0]["targets"] = [site]
    jobs["appliance-tls"]["relabel_configs"][-1]["replacement"] = blackbox
    return config


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        answer = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def metric_names(self) -> set[str]:
        return set(httpx.get(self.url + "/api/v1/label/__name__/values", timeout=30)
                   .json()["data"])

    def targets_up(self) -> dict[str, str]:
        active = httpx.get(self.url + "/api/v1/targets", timeout=30).json()["data"]
        return {t["labels"]["job"]: t["health"] for t in active["activeTargets"]}


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen in {timeout}s")


def traffic(gw) -> None:
    """Streams and plain calls with a shared prompt prefix, one cut by max_tokens, and a key
    refused by its requests-per-minute limit."""
    client = gw.client("grafana")
    prefix = "You are a terse assistant. Answer in one short line. " * 8

    def chat(i: int) -> None:
        messages = [{"role": "user", "content": f"{prefix} Question {i}?"}]
        if i % 2:
            stream = client.chat.completions.create(model=SERVED_NAME, messages=messages,
                                                    max_tokens=16, stream=True)
            assert sum(1 for _ in stream) > 1
        else:
            client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=8)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(chat, range(18)))
    gw.key("grafana-metered-key", "--quota-tokens", "100000")
    gw.client("grafana-metered-key").completions.create(model=SERVED_NAME, prompt="hello",
                                                         max_tokens=4)
    gw.key("grafana-limited-key", "--rpm", "1")
    limited = gw.client("grafana-limited-key")
    limited.completions.create(model=SERVED_NAME, prompt="hello", max_tokens=4)
    with pytest.raises(openai.RateLimitError):
        limited.completions.create(model=SERVED_NAME, prompt="hello", max_tokens=4)


@pytest.fixture(scope="module")
def gw(vllm, tmp_path_factory):
    """A gateway of this module's own, with two engine slots, so the traffic queues in it."""
    with gateway(vllm.url, tmp_path_factory.mktemp("dashboard-gw"), engine_api_key=vllm.key,
                 engine_concurrency=2) as p:
        yield p


@pytest.fixture(scope="module")
def prometheus(vllm, gw, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    site = render(workdir / "nginx", gw.url.removeprefix("http://"))
    blackbox_port, prometheus_port = free_port(), free_port()
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(scrape_config(
        gw.url.removeprefix("http://"), site.https + "/health", f"127.0.0.1:{blackbox_port}")))
    (workdir / RULES.name).write_text(RULES.read_text())
    (workdir / "appliance-engines.json").write_text(json.dumps(
        [{"targets": [vllm.url.removeprefix("http://")]}]))
    url = f"http://127.0.0.1:{prometheus_port}"
    with (
        serving(site),
        running([tool("prometheus-blackbox-exporter"),
                 f"--config.file={BUNDLE / 'blackbox.yml'}",
                 f"--web.listen-address=127.0.0.1:{blackbox_port}"],
                ready_url=f"http://127.0.0.1:{blackbox_port}/", log=workdir / "blackbox.log"),
        running([tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                ready_url=url + "/-/ready", timeout=60, log=workdir / "prometheus.log"),
    ):
        prom = Prometheus(url)
        wait_until(lambda: set(prom.targets_up().values()) == {"up"}, 60, "every target up")
        traffic(gw)
        # Two scrapes after the traffic, so every rate() has its increase.
        time.sleep(3 * SCRAPE_INTERVAL_S)
        yield prom


def test_every_target_is_scraped(prometheus):
    assert prometheus.targets_up() == {"appliance-gateway": "up", "vllm": "up",
                                       "appliance-tls": "up"}


def test_dashboard_is_importable_with_the_datasource_as_a_variable():
    board = dashboard()
    assert board["uid"] and board["title"] and "id" not in board
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_dashboard_has_the_panels_operators_look_for():
    titles = {panel["title"] for panel in dashboard()["panels"]}
    assert {"E2E request latency", "Time to first token", "Inter-token latency",
            "Token throughput", "Scheduler state", "KV cache usage", "Prefix cache hit rate",
            "Finish reasons", "Requests by key and status", "Rate-limit and quota refusals",
            "Tokens per key", "Queue wait", "Quota left per key"} <= titles


def test_every_panel_query_returns_a_series(prometheus):
    variable = dashboard()["templating"]["list"][1]["definition"]
    metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable).groups()
    models = [s["metric"][label] for s in prometheus.query(f"group by ({label}) ({metric})")]
    assert models == [SERVED_NAME]
    empty = []
    for title, expr in panel_queries():
        concrete = expr.replace("$__rate_interval", RATE_INTERVAL).replace(
            "$model_name", models[0])
        if not prometheus.query(concrete):
            empty.append(f"{title}: {concrete}")
    assert not empty, "panels with no data:\n" + "\n".join(empty)


def test_every_metric_the_alerts_use_is_scraped(prometheus):
    names = prometheus.metric_names()
    used = set()
    for rule in alerts():
        used |= set(re.findall(r"\b(?:vllm:[a-z_:]+|appliance_[a-z_]+|probe_[a-z_]+)",
                               rule["expr"]))
    assert used and not used - names, f"not scraped: {sorted(used - names)}"


def test_every_alert_expression_evaluates(prometheus):
    for rule in alerts():
        prometheus.query(rule["expr"])


def test_the_certificate_alert_sees_the_served_certificate(prometheus):
    left = prometheus.query('probe_ssl_earliest_cert_expiry{job="appliance-tls"} - time()')
    assert len(left) == 1
    assert 14 * 86400 < float(left[0]["value"][1]) < 3700 * 86400
    rule = next(r for r in alerts() if r["alert"] == "ApplianceCertificateExpiresSoon")
    assert prometheus.query(rule["expr"]) == []



def test_every_metric_cloudwatch_ships_is_scraped(prometheus):
    agent = json.loads((ROOT / "observability" / "cloudwatch" / "amazon-cloudwatch-agent.json")
                       .read_text())
    names = prometheus.metric_names()
    emf = agent["logs"]["metrics_collected"]["prometheus"]["emf_processor"]
    for declaration in emf["metric_declaration"]:
        for selector in declaration["metric_selectors"]:
            assert any(re.search(selector, name) for name in names), selector
    assert set(emf["metric_unit"]) <= names
