"""The playground page as the real NGINX serves it: from the image's files, with a CSP that
allows only its own script, style and origin, and nothing inline or from elsewhere."""

import re
from html.parser import HTMLParser

import httpx
import pytest

from tests.integration.nginx_stack import SECURITY_HEADERS, render, serving
from tests.servers import ROOT

PAGE_DIR = ROOT / "nginx" / "playground"
PLAYGROUND_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                  "img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


@pytest.fixture(scope="module")
def client(gw, tmp_path_factory):
    site = render(tmp_path_factory.mktemp("playground-edge"), gw.url.removeprefix("http://"))
    with serving(site), httpx.Client(base_url=site.https, verify=site.trust(), timeout=30) as c:
        yield c


class Page(HTMLParser):
    """Every tag and attribute of the page, and whether any script or style is inline."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.open: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, dict(attrs)))
        self.open.append(tag)

    def handle_endtag(self, tag) -> None:
        if self.open and self.open[-1] == tag:
            self.open.pop()

    def handle_data(self, data) -> None:
        if self.open and self.open[-1] in ("script", "style") and data.strip():
            self.inline.append(data.strip()[:40])


def parsed(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


@pytest.mark.parametrize(("path", "kind"), [
    ("/playground", "text/html"),
    ("/playground/", "text/html"),
    ("/playground/playground.js", "text/javascript"),
    ("/playground/playground.css", "text/css"),
])
def test_page_and_assets_are_served_with_the_page_policy(client, path, kind):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(kind)
    assert response.headers["content-security-policy"] == PLAYGROUND_CSP
    for name, value in SECURITY_HEADERS.items():
        if name != "content-security-policy":
            assert response.headers[name] == value, name


def test_the_api_keeps_its_own_strict_policy(client):
    response = client.get("/v1/models")
    assert response.headers["content-security-policy"] == SECURITY_HEADERS[
        "content-security-policy"]
    assert client.get("/playgroundx").headers["content-security-policy"] == SECURITY_HEADERS[
        "content-security-policy"]


def test_only_reading_the_page_is_allowed(client):
    assert client.post("/playground", content=b"x").status_code == 403
    assert client.delete("/playground/playground.js").status_code == 403
    assert client.get("/playground/../keys.db").status_code in (400, 404)
    assert client.get("/playground/missing.js").status_code == 404


def test_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere(client):
    page = parsed(client.get("/playground").text)
    assert not page.inline
    for tag, attrs in page.tags:
        assert "style" not in attrs, tag
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        for name in ("src", "href", "action"):
            if name in attrs:
                assert attrs[name].startswith("/playground/"), (tag, attrs)
    scripts = [attrs["src"] for tag, attrs in page.tags if tag == "script"]
    assert scripts == ["/playground/playground.js"]


def test_script_talks_only_to_this_origin_and_keeps_the_key_out_of_urls():
    script = (PAGE_DIR / "playground.js").read_text()
    urls = re.findall(r"fetch\(\s*([\"'`])(.*?)\1", script)
    assert {url for _, url in urls} == {"/v1/models", "/v1/chat/completions"}
    assert not re.search(r"https?://|localStorage|console\.", script)
    assert "sessionStorage" in script
    assert not re.search(r"[?&]key=|searchParams|location\.(search|hash)", script)
