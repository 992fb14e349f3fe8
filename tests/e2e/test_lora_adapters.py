"""LoRA adapters on the real vLLM (CPU): ``appliance-models`` adds one to a running engine,
it is listed and served, a bad one is refused and undone, and removing it makes it 404; an
engine started with the adapters list loads them at start, and a gateway key limited to an
adapter's name can use it and sees only it."""

import json
import shutil
import subprocess

import httpx
import pytest

from server.adapters import read_adapters
from server.models_cli import EXIT_FAILED, EXIT_NO_LORA
from server.models_cli import main as appliance_models
from tests.e2e.engine_stack import ENGINE_BIN, SERVED_NAME, engine
from tests.integration.proxy_stack import gateway
from tests.servers import ROOT

PROMPT = "The appliance answers questions over HTTPS."


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora") / "support"
    subprocess.run([str(ENGINE_BIN / "python"), str(ROOT / "scripts" / "make_tiny_model.py"),
                    str(directory), "--lora", "--seed", "1"], check=True, capture_output=True)
    return directory


def tool(monkeypatch, workdir, url, *args: str) -> int:
    """``appliance-models`` as the host runs it: the engine's env file (its internal key), its
    adapters list and cache, and the engines' addresses as first boot gives them."""
    monkeypatch.setenv("APPLIANCE_ENV_FILE", str(workdir / "appliance.env"))
    monkeypatch.setenv("APPLIANCE_ADAPTERS_FILE", str(workdir / "adapters.json"))
    monkeypatch.setenv("APPLIANCE_MODEL_CACHE", str(workdir / "models"))
    monkeypatch.setenv("APPLIANCE_MODELS_FILE", str(workdir / "no-models.toml"))
    monkeypatch.setenv("APPLIANCE_ENGINE_URLS", url)
    monkeypatch.delenv("APPLIANCE_ENGINE_API_KEY", raising=False)
    return appliance_models(list(args))


def served(e, model: str) -> httpx.Response:
    return httpx.post(e.url + "/v1/completions", headers={"Authorization": f"Bearer {e.key}"},
                      json={"model": model, "prompt": PROMPT, "max_tokens": 4}, timeout=120)


def cards(e) -> dict[str, dict]:
    listed = httpx.get(e.url + "/v1/models", headers={"Authorization": f"Bearer {e.key}"})
    return {card["id"]: card for card in listed.json()["data"]}


def test_an_adapter_added_at_runtime_is_served_then_removed(tiny_model, adapter_dir, tmp_path,
                                                            monkeypatch, capsys):
    workdir = tmp_path / "engine"
    with engine(tiny_model, workdir, enable_lora="true", max_num_seqs=4,
                adapters_file=workdir / "adapters.json") as e:
        assert tool(monkeypatch, workdir, e.url, "add-adapter", "support", str(adapter_dir),
                    "--base", SERVED_NAME) == 0
        assert cards(e)["support"]["parent"] == SERVED_NAME
        anonymous = httpx.post(e.url + "/v1/load_lora_adapter",
                               json={"lora_name": "x", "lora_path": str(adapter_dir)})
        assert anonymous.status_code == 401  # the adapter API takes only the internal key
        answer = served(e, "support")
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "support"
        assert [a.name for a in read_adapters(workdir / "adapters.json")] == ["support"]
        assert tool(monkeypatch, workdir, e.url, "list") == 0
        assert "support  tiny  added" in capsys.readouterr().out

        # vLLM refuses an adapter above the engine's --max-lora-rank: exit 1, the reason, undone.
        too_big = tmp_path / "too-big"
        shutil.copytree(adapter_dir, too_big)
        config = json.loads((too_big / "adapter_config.json").read_text())
        (too_big / "adapter_config.json").write_text(json.dumps(config | {"r": 64}))
        assert tool(monkeypatch, workdir, e.url, "add-adapter", "big", str(too_big),
                    "--base", SERVED_NAME) == EXIT_FAILED
        err = capsys.readouterr().err
        print(err)
        assert "add-adapter failed" in err and "big" not in cards(e)
        assert [a.name for a in read_adapters(workdir / "adapters.json")] == ["support"]

        assert tool(monkeypatch, workdir, e.url, "remove-adapter", "support") == 0
        assert "support" not in cards(e)
        assert served(e, "support").status_code == 404
        assert read_adapters(workdir / "adapters.json") == []


def test_listed_adapters_load_at_start_and_a_key_may_be_limited_to_one(
        tiny_model, adapter_dir, tmp_path):
    workdir = tmp_path / "engine"
    workdir.mkdir()
    (workdir / "adapters.json").write_text(json.dumps({"adapters": [
        {"name": "support", "source": str(adapter_dir), "base": SERVED_NAME}]}))
    with engine(tiny_model, workdir, max_num_seqs=4,
                adapters_file=workdir / "adapters.json") as e:
        assert "--lora-modules" in e.log.read_text()
        assert cards(e)["support"]["parent"] == SERVED_NAME
        (tmp_path / "gw").mkdir()
        with gateway(e.url, tmp_path / "gw", engine_api_key=e.key, max_num_seqs=4) as gw:
            headers = {"Authorization": f"Bearer {gw.key('support-only', '--models', 'support')}"}
            listed = httpx.get(gw.url + "/v1/models", headers=headers).json()
            assert [card["id"] for card in listed["data"]] == ["support"]
            answer = httpx.post(gw.url + "/v1/completions", headers=headers, timeout=120,
                                json={"model": "support", "prompt": PROMPT, "max_tokens": 4})
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == "support"
            # vLLM's adapter API is not a route of the gateway: no client key reaches it.
            load = httpx.post(gw.url + "/v1/load_lora_adapter", headers=headers,
                              json={"lora_name": "x", "lora_path": str(adapter_dir)})
            assert load.status_code == 404, load.text
            base = httpx.post(gw.url + "/v1/completions", headers=headers, timeout=120,
                              json={"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": 4})
            assert base.status_code in (403, 404), base.text


def test_an_engine_started_without_lora_says_it_needs_a_restart(tiny_model, adapter_dir,
                                                               tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "engine"
    with engine(tiny_model, workdir, max_num_seqs=4,
                adapters_file=workdir / "adapters.json") as e:
        assert "--enable-lora" not in e.log.read_text()
        assert tool(monkeypatch, workdir, e.url, "add-adapter", "support", str(adapter_dir),
                    "--base", SERVED_NAME) == EXIT_NO_LORA
        err = capsys.readouterr().err
        print(err)
        assert "without LoRA" in err and "restart" in err
        assert "support" not in cards(e)
        assert read_adapters(workdir / "adapters.json") == []
