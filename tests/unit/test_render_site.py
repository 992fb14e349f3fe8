"""appliance_ops/render_site.py: placeholders, parameter checks, and the rules the site must
keep."""

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from proxy.settings import ProxySettings

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "render_site", ROOT / "appliance_ops" / "render_site.py"
)
render_site = importlib.util.module_from_spec(spec)
sys.modules["render_site"] = render_site
spec.loader.exec_module(render_site)

SiteParams = render_site.SiteParams
OUT = Path("/srv/site")


def rendered(params: SiteParams | None = None, standalone: bool = True) -> dict[str, str]:
    files = render_site.rendered_files(params or SiteParams(), OUT, standalone)
    return {str(path.relative_to(OUT)): text for path, text in files.items()}


def site(params: SiteParams | None = None) -> str:
    return rendered(params)["appliance.conf"]


def blocks(text: str) -> list[tuple[str, str]]:
    """(header, direct body) of every ``{}`` block: the body without its nested blocks."""
    text = re.sub(r"#[^\n]*", "", text)
    text = re.sub(r"'[^']*'", "''", text)
    found, stack = [], []
    start_of_statement = 0
    for i, char in enumerate(text):
        if char == "{":
            stack.append([text[start_of_statement:i].strip(), []])
            start_of_statement = i + 1
        elif char == "}":
            header, body = stack.pop()
            body.append(text[start_of_statement:i])
            found.append((header, "".join(body)))
            start_of_statement = i + 1
        elif char == ";":
            if stack:
                stack[-1][1].append(text[start_of_statement : i + 1])
            start_of_statement = i + 1
    return found


def test_every_placeholder_is_filled_and_nginx_variables_are_left_alone():
    for name, text in rendered().items():
        assert not re.search(r"\$\{[A-Z]", text), name
    text = site()
    assert "$request_uri" in text and "$binary_remote_addr" in text and "$host" in text


def test_unknown_placeholder_is_an_error_not_an_empty_string():
    with pytest.raises(KeyError):
        render_site.render_text("listen ${NO_SUCH_THING};", {})
    assert render_site.render_text("a ${X} $x ${y}", {"X": "1"}) == "a 1 $x ${y}"


def test_production_defaults():
    text = site()
    assert re.search(r"listen 80 default_server;", text)
    assert re.search(r"listen 443 ssl http2 default_server;", text)
    assert "return 301 https://$host$request_uri;" in text
    assert "ssl_certificate /etc/appliance/tls/self-signed.crt;" in text
    assert "server 127.0.0.1:8080 max_fails=0;" in text
    assert "hash $appliance_key consistent;" in text


def test_one_upstream_server_per_gateway_worker_on_consecutive_ports():
    text = rendered(SiteParams(upstream="127.0.0.1:9000", gateway_workers=3))["appliance.conf"]
    servers = re.findall(r"^\s*server (\S+) max_fails=0;$", text, re.MULTILINE)
    assert servers == ["127.0.0.1:9000", "127.0.0.1:9001", "127.0.0.1:9002"]


def test_test_ports_and_a_domain():
    params = SiteParams(
        server_name="api.example.com", listen_addr="127.0.0.1", http_port=8081, https_port=8443
    )
    text = site(params)
    assert "listen 127.0.0.1:8081 default_server;" in text
    assert "listen 127.0.0.1:8443 ssl http2 default_server;" in text
    assert "server_name api.example.com;" in text
    assert "return 301 https://api.example.com:8443$request_uri;" in text


def test_body_limit_matches_the_proxy():
    size = SiteParams().body_size
    assert size.endswith("m") and int(size[:-1]) * 1024 * 1024 == ProxySettings().max_body_bytes
    assert "client_max_body_size 16m;" in site()
    assert "client_max_body_size 201m;" in site()  # /v1/files uploads only
    files = SiteParams().file_body_size
    assert int(files[:-1]) * 1024 * 1024 > ProxySettings().batch_max_file_bytes


def test_generation_timeouts_outlast_every_proxy_deadline_and_short_ones_its_short_deadline():
    proxy, params = ProxySettings(), SiteParams()
    assert params.long_timeout_s > max(
        proxy.timeout_max_s, proxy.stream_first_token_timeout_s, proxy.stream_idle_timeout_s
    )
    assert params.short_timeout_s > proxy.short_timeout_s


def test_each_route_gets_its_timeout_class():
    params = SiteParams(long_timeout_s=700, short_timeout_s=12)
    routes = {
        header: body
        for header, body in blocks(site(params))
        if header.startswith("location") and "proxy_pass" in body
    }
    generation = [h for h in routes if "chat/completions" in h or "files|batches" in h]
    assert len(generation) == 2
    for header in generation:
        assert "proxy_read_timeout 700s;" in routes[header]
    for header, body in routes.items():
        if header not in generation:
            assert "proxy_read_timeout 12s;" in body, header
    for path in ("/v1/models", "/health", "/ready", "/metrics", "/tokenize", "/v1/files",
                 "/v1/files/file-1/content", "/v1/batches", "/v1/batches/batch_1/cancel"):
        assert any(re.search(h.split()[-1], path) or h.endswith(path) for h in routes), path


def test_every_block_that_adds_a_header_includes_the_security_snippet():
    """NGINX forgets inherited add_header in a block that sets its own."""
    files = rendered()
    for name, text in files.items():
        if name.endswith("security-headers.conf"):
            continue
        for header, body in blocks(text):
            if "add_header" in body:
                assert "security-headers.conf" in body, f"{name}: {header}"
    servers = [body for header, body in blocks(files["appliance.conf"]) if header == "server"]
    assert len(servers) == 2
    for body in servers:
        assert "security-headers.conf;" in body
        assert "json-errors.conf;" in body
        assert "server_tokens off;" in body


def test_security_snippet_sets_every_header_always():
    text = rendered()["snippets/security-headers.conf"]
    for name in (
        "Strict-Transport-Security",
        "X-Content-Type-Options",
        "X-Frame-Options",
        "Referrer-Policy",
        "Content-Security-Policy",
    ):
        assert re.search(rf"^add_header {name} .* always;$", text, re.M), name


def test_json_error_pages_are_openai_shaped_and_anthropics_on_its_routes():
    text = rendered()["snippets/json-errors.conf"]
    bodies = re.findall(r"return (\d+) '(.*)\\n';", text)
    statuses = {int(code) for code, _ in bodies}
    assert {400, 403, 404, 405, 413, 429, 502, 503, 504} <= statuses
    anthropic = set()
    for code, body in bodies:
        answer = json.loads(body)
        if answer.get("type") == "error":
            assert set(answer["error"]) == {"type", "message"}
            anthropic.add(int(code))
        else:
            assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert {413, 429, 502, 503, 504} <= anthropic


def test_tls_is_modern_only():
    text = rendered()["snippets/tls.conf"]
    assert re.search(r"^ssl_protocols TLSv1\.2 TLSv1\.3;$", text, re.M)
    ciphers = re.search(r"^ssl_ciphers (\S+);$", text, re.M).group(1).split(":")
    assert all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in ciphers)
    assert "ssl_session_tickets off;" in text
    assert "ssl_stapling on;" in text


def test_streaming_is_never_buffered():
    proxy_params = rendered()["snippets/proxy-params.conf"]
    assert "proxy_buffering off;" in proxy_params
    assert "proxy_http_version 1.1;" in proxy_params
    assert 'proxy_set_header Connection "";' in proxy_params
    assert "gzip off;" in site()
    assert re.search(r"upstream appliance_gateway \{[^}]*keepalive \d+;", site())


def test_standalone_main_config_includes_the_site():
    files = rendered(standalone=True)
    assert f"include {OUT}/appliance.conf;" in files["nginx.conf"]
    assert f"pid {OUT}/nginx.pid;" in files["nginx.conf"]
    assert "nginx.conf" not in rendered(standalone=False)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"server_name": "bad name"}, "host name"),
        ({"server_name": "-x.example.com"}, "host name"),
        ({"http_port": 0}, "not a port"),
        ({"https_port": 70000}, "not a port"),
        ({"http_port": 8443, "https_port": 8443}, "differ"),
        ({"listen_addr": "localhost"}, "IPv4"),
        ({"upstream": "8080"}, "host:port"),
        ({"gateway_workers": 0}, "gateway_workers"),
        ({"upstream": "127.0.0.1:65535", "gateway_workers": 2}, "gateway_workers"),
        ({"body_size": "16 MB"}, "NGINX size"),
        ({"long_timeout_s": 0}, "at least 1"),
        ({"burst": 0}, "at least 1"),
        ({"conn_per_ip": 70000}, "at most 65535"),
        ({"short_timeout_s": 30, "long_timeout_s": 20}, "must not exceed"),
        ({"cert": "relative.pem"}, "absolute path"),
        ({"key": "/etc/x y.key"}, "absolute path"),
        ({"webroot": "/var/www;evil"}, "absolute path"),
    ],
)
def test_bad_parameters_are_refused(change, complaint):
    wrong = render_site.problems(dataclasses.replace(SiteParams(), **change))
    assert any(complaint in line for line in wrong), wrong


def test_defaults_are_acceptable():
    assert render_site.problems(SiteParams()) == []
    assert render_site.problems(SiteParams(server_name="api.example.com")) == []


def test_cli_update_keeps_everything_not_given(tmp_path):
    out = tmp_path / "site"
    assert (
        render_site.main(
            [
                "--out-dir",
                str(out),
                "--http-port",
                "8081",
                "--https-port",
                "8443",
                "--upstream",
                "127.0.0.1:9000",
            ]
        )
        == 0
    )
    assert (
        render_site.main(
            [
                "--out-dir",
                str(out),
                "--update",
                "--server-name",
                "api.example.com",
                "--cert",
                "/c/f.pem",
            ]
        )
        == 0
    )
    params = render_site.load_params(out)
    assert (params.http_port, params.https_port, params.upstream) == (8081, 8443, "127.0.0.1:9000")
    assert (params.server_name, params.cert) == ("api.example.com", "/c/f.pem")
    assert "ssl_certificate /c/f.pem;" in (out / "appliance.conf").read_text()


def test_cli_refuses_bad_parameters_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "site"
    assert render_site.main(["--out-dir", str(out), "--server-name", "no spaces"]) == 2
    assert "not a host name" in capsys.readouterr().err
    assert not out.exists()


def test_cli_show(tmp_path, capsys):
    out = tmp_path / "site"
    render_site.main(["--out-dir", str(out), "--webroot", "/srv/acme"])
    capsys.readouterr()
    assert render_site.main(["--out-dir", str(out), "--show", "webroot"]) == 0
    assert capsys.readouterr().out.strip() == "/srv/acme"


def test_cli_update_needs_an_earlier_render(tmp_path, capsys):
    assert render_site.main(["--out-dir", str(tmp_path), "--update", "--http-port", "81"]) == 2
    assert "nothing rendered" in capsys.readouterr().err


def test_cors_is_off_by_default_and_renders_each_named_origin():
    text = site()
    assert '$http_origin;' not in text.split("$appliance_cors_origin {", 1)[1].split("}", 1)[0]
    named = site(SiteParams(cors_origins="https://app.example.com, http://localhost:3000"))
    assert '"https://app.example.com" $http_origin;' in named
    assert '"http://localhost:3000" $http_origin;' in named
    assert 'default "Origin";' in named
    assert '"~." $http_origin;' in site(SiteParams(cors_origins="*"))


@pytest.mark.parametrize("origin", ["app.example.com", "https://app.example.com/path",
                                    "https://x.example.com;", 'https://"a"', "ftp://a.b"])
def test_bad_cors_origins_are_refused(origin):
    assert any("CORS origin" in p for p in render_site.problems(SiteParams(cors_origins=origin)))


def test_cors_origins_come_from_the_environment_unless_given(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_CORS_ORIGINS", "https://env.example.com")
    assert render_site.main(["--out-dir", str(tmp_path)]) == 0
    assert render_site.load_params(tmp_path).cors_origins == "https://env.example.com"
    assert render_site.main(["--out-dir", str(tmp_path), "--cors-origins", ""]) == 0
    assert render_site.load_params(tmp_path).cors_origins == ""


def test_nginx_drops_idle_upstream_connections_before_the_gateway_does():
    """The server side of a kept-alive connection must outlast its client's idea of it."""
    upstream = re.search(r"upstream appliance_gateway \{([^}]*)\}", site()).group(1)
    nginx_idle_s = int(re.search(r"keepalive_timeout (\d+)s;", upstream).group(1))
    gateway_idle_s = ProxySettings(_env_file=None).proxy_keepalive_s
    assert nginx_idle_s + 10 <= gateway_idle_s
