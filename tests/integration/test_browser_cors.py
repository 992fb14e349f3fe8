"""A real browser (headless Chromium) calling the API from a web page on another origin.

The page's fetch() carries a key and a JSON body, so the browser sends a CORS preflight first;
NGINX answers it at the edge for the origins APPLIANCE_CORS_ORIGINS names, and the browser
then sends the request itself and lets the page read the answer and its exposed headers.
"""

import contextlib
import functools
import html
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.nginx_stack import render, serving
from tests.servers import free_port

CHROMIUM = shutil.which("chromium") or "chromium"
PAGE = """<html><body><pre id="out">pending</pre><script>
fetch("{api}/v1/chat/completions", {{
  method: "POST",
  headers: {{"Authorization": "Bearer {key}", "Content-Type": "application/json"}},
  body: JSON.stringify({{model: "fake-model", messages: [{{role: "user", content: "hi"}}],
                         max_tokens: 3}})
}}).then(r => r.json().then(body => {{
  document.getElementById("out").textContent = JSON.stringify(
    {{status: r.status, requestId: r.headers.get("x-request-id"), object: body.object}});
}})).catch(e => {{
  document.getElementById("out").textContent = JSON.stringify({{blocked: String(e)}});
}});
</script></body></html>
"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def web_page(directory: Path) -> Iterator[str]:
    """A plain web server for the page: its address is the page's origin."""
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port),
                                 functools.partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def browse(url: str, profile: Path) -> dict:
    """Load ``url`` in headless Chromium, let its scripts run, and read what the page wrote."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
         f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="out">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, done.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture
def page_dir(tmp_path) -> Path:
    directory = tmp_path / "www"
    directory.mkdir()
    return directory


def test_browser_on_an_allowed_origin_calls_the_api(gw, tmp_path, page_dir):
    with web_page(page_dir) as origin:
        site = render(tmp_path / "edge", gw.url.removeprefix("http://"), cors_origins=origin)
        (page_dir / "page.html").write_text(PAGE.format(api=site.https, key=gw.key("browser")))
        with serving(site):
            seen = browse(origin + "/page.html", tmp_path / "profile")
    assert seen["status"] == 200 and seen["object"] == "chat.completion"
    assert re.fullmatch(r"[0-9a-f]{32}", seen["requestId"])  # an exposed header
    entries = [(e["method"], e["status"], e["upstream_status"]) for e in site.log_entries()
               if e["path"] == "/v1/chat/completions"]
    assert entries == [("OPTIONS", 204, ""), ("POST", 200, "200")]


def test_browser_on_another_origin_is_stopped_by_the_preflight(gw, tmp_path, page_dir):
    with web_page(page_dir) as origin:
        site = render(tmp_path / "edge", gw.url.removeprefix("http://"),
                      cors_origins="https://app.example.com")
        (page_dir / "page.html").write_text(PAGE.format(api=site.https, key=gw.key("browser")))
        with serving(site):
            seen = browse(origin + "/page.html", tmp_path / "profile")
    assert "blocked" in seen
    entries = [(e["method"], e["status"]) for e in site.log_entries()
               if e["path"] == "/v1/chat/completions"]
    assert entries == [("OPTIONS", 405)]  # the request itself was never sent
