"""LoRA adapters: the adapters list, vLLM's LoRA arguments, the models file's adapters, and
what ``appliance-models`` does with engines that refuse or fake a load (a mock vLLM)."""

import json
from pathlib import Path

import httpx
import pytest

from server.adapters import (
    Adapter,
    AdaptersError,
    adapter_rank,
    adapters_of,
    lora_argv,
    max_lora_rank,
    read_adapters,
    with_adapter,
    without_adapter,
    write_adapters,
)
from server.argv import engine_argv, engine_env
from server.main import lora_args
from server.models_cli import EXIT_NO_LORA, AdapterFailed, EngineApi, add_adapter, remove_adapter
from server.models_file import ModelsFileError, parse_models
from server.settings import EngineSettings
from tests.unit.test_server_argv import PYTHON, plan_for

ADAPTER = Adapter(name="support", source="/srv/support", base="chat")


def make_adapter(directory: Path, rank: int = 8) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    return directory


def test_the_adapters_list_round_trips_and_is_replaced_whole(tmp_path):
    path = tmp_path / "state" / "adapters.json"
    assert read_adapters(path) == []
    other = Adapter(name="legal", source="org/legal-lora", base="chat")
    write_adapters(path, with_adapter(with_adapter([], ADAPTER), other))
    assert read_adapters(path) == [ADAPTER, other]
    write_adapters(path, without_adapter(read_adapters(path), "support"))
    assert read_adapters(path) == [other]
    assert [p.name for p in path.parent.iterdir()] == ["adapters.json"]  # no temporary left


def test_adding_an_adapter_of_the_same_name_replaces_it():
    newer = Adapter(name="support", source="/srv/support-v2", base="chat")
    assert with_adapter([ADAPTER], newer) == [newer]


def test_a_broken_adapters_list_is_an_error_not_an_empty_list(tmp_path):
    path = tmp_path / "adapters.json"
    path.write_text("{not json")
    with pytest.raises(AdaptersError, match="cannot read"):
        read_adapters(path)
    path.write_text(json.dumps({"adapters": [{"name": "x"}]}))
    with pytest.raises(AdaptersError, match="name, source and base"):
        read_adapters(path)


def test_a_model_gets_its_own_adapters_and_the_list_wins_over_the_models_file():
    static = (ADAPTER, Adapter(name="other", source="/o", base="embed"))
    listed = [Adapter(name="support", source="/srv/v2", base="chat"),
              Adapter(name="legal", source="/l", base="chat")]
    assert adapters_of("chat", static, listed) == listed
    assert adapters_of("embed", static, listed) == [static[1]]
    assert adapters_of("none", static, listed) == []


def test_max_lora_rank_is_the_smallest_vllm_value_that_holds_every_adapter():
    assert max_lora_rank([]) == 16
    assert max_lora_rank([8]) == 16
    assert max_lora_rank([17]) == 32
    assert max_lora_rank([64, 8]) == 64
    with pytest.raises(AdaptersError):
        max_lora_rank([1024])


def test_lora_argv_names_every_adapter_and_raises_the_rank_only_when_needed():
    assert lora_argv([], []) == ["--enable-lora"]
    assert lora_argv([("a", Path("/a")), ("b", Path("/b"))], [8, 8]) == [
        "--enable-lora", "--lora-modules", "a=/a", "b=/b"]
    assert lora_argv([("a", Path("/a"))], [64]) == [
        "--enable-lora", "--lora-modules", "a=/a", "--max-lora-rank", "64"]


def test_adapter_rank_reads_peft_config_and_refuses_what_is_not_lora(tmp_path):
    assert adapter_rank(make_adapter(tmp_path / "a", rank=4)) == 4
    with pytest.raises(AdaptersError, match=r"no readable adapter_config\.json"):
        adapter_rank(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 8}))
    with pytest.raises(AdaptersError, match="not a LoRA"):
        adapter_rank(tmp_path)


def test_engine_argv_puts_lora_before_the_extra_args_so_they_still_win():
    plan = plan_for("gpu", engine_extra_args="--max-loras 4")
    argv = engine_argv(plan, PYTHON, ["--enable-lora", "--lora-modules", "a=/a"])
    assert argv[-5:] == ["--enable-lora", "--lora-modules", "a=/a", "--max-loras", "4"]
    assert "--enable-lora" not in engine_argv(plan, PYTHON)


def test_engine_env_opens_the_runtime_adapter_api_only_with_lora():
    plan = plan_for("gpu")
    assert engine_env(plan, "k", {}, lora=True)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in engine_env(plan, "k", {})


def settings_for(tmp_path: Path, **values) -> EngineSettings:
    return EngineSettings(_env_file=None, model="/models/chat", served_model_name="chat",
                          model_cache=tmp_path / "cache", adapters_file=tmp_path / "a.json",
                          models_file=tmp_path / "models.toml", **values)


def test_no_lora_without_adapters_unless_enable_lora(tmp_path):
    assert lora_args(settings_for(tmp_path), ()) == []
    assert lora_args(settings_for(tmp_path, enable_lora=True), ()) == ["--enable-lora"]


def test_an_engine_starts_with_the_models_file_adapters_and_the_listed_ones(tmp_path):
    static = make_adapter(tmp_path / "static")
    listed = make_adapter(tmp_path / "listed", rank=32)
    settings = settings_for(tmp_path)
    write_adapters(settings.adapters_file, [
        Adapter("listed", str(listed), "chat"), Adapter("elsewhere", str(listed), "other")])
    assert lora_args(settings, (Adapter("static", str(static), "chat"),)) == [
        "--enable-lora", "--lora-modules", f"static={static}", f"listed={listed}",
        "--max-lora-rank", "32"]


MODELS = """
[[models]]
name = "chat"
source = "/models/chat"
enable_lora = true
adapters = [{name = "support", source = "/srv/support"}, {name = "legal", source = "org/legal"}]

[[models]]
name = "embed"
source = "/models/embed"
task = "embed"
"""


def test_the_models_file_lists_adapters_per_model():
    chat, embed = parse_models(MODELS, EngineSettings(_env_file=None))
    assert chat.adapters == (ADAPTER, Adapter("legal", "org/legal", "chat"))
    assert chat.settings.enable_lora and not embed.settings.enable_lora
    assert embed.adapters == ()


@pytest.mark.parametrize(("adapters", "error"), [
    ('"x"', "key 'adapters': a list of"),
    ('[{name = "a b", source = "/s"}]', "adapter #1: a name without spaces"),
    ('[{name = "a"}]', "adapter 'a': a directory"),
    ('[{name = "a", source = "/s", rank = 8}]', "unknown key(s) rank"),
    ('[{name = "chat", source = "/s"}]', "adapter 'chat': the name is taken already"),
    ('[{name = "embed", source = "/s"}]', "the name is taken by [[models]] #1"),
])
def test_bad_adapters_in_the_models_file_are_named(adapters, error):
    text = (f'[[models]]\nname = "chat"\nsource = "/m"\nadapters = {adapters}\n'
            '[[models]]\nname = "embed"\nsource = "/e"\n')
    with pytest.raises(ModelsFileError) as caught:
        parse_models(text, EngineSettings(_env_file=None))
    assert any(error in e for e in caught.value.errors), caught.value.errors


class FakeVllm:
    """vLLM's adapter API as a mock transport; ``lying`` answers 200 and loads nothing."""

    def __init__(self, lora: bool = True, lying: bool = False):
        self.lora, self.lying = lora, lying
        self.cards = {"chat": {"id": "chat", "parent": None}}
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        body = json.loads(request.content or b"{}")
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": list(self.cards.values())})
        if request.url.path.endswith("_lora_adapter") and not self.lora:
            return httpx.Response(404, json={"detail": "Not Found"})
        if request.url.path == "/v1/load_lora_adapter":
            if not self.lying:
                self.cards[body["lora_name"]] = {"id": body["lora_name"], "parent": "chat"}
            return httpx.Response(200, text="Success")
        if request.url.path == "/v1/unload_lora_adapter":
            if self.cards.pop(body["lora_name"], None) is None:
                return httpx.Response(404, json={"error": {"message": "cannot be found"}})
            return httpx.Response(200, text="Success")
        if request.url.path == "/v1/completions":
            ok = body["model"] in self.cards
            return httpx.Response(200 if ok else 404, json={"error": {"message": "no model"}})
        return httpx.Response(404, json={"detail": "Not Found"})


def engines(*fakes: FakeVllm) -> list[EngineApi]:
    return [EngineApi(f"http://engine{i}", httpx.Client(transport=httpx.MockTransport(fake)))
            for i, fake in enumerate(fakes)]


def test_add_adapter_loads_into_every_replica_verifies_and_records(tmp_path):
    settings = settings_for(tmp_path)
    adapter = Adapter("support", str(make_adapter(tmp_path / "support")), "chat")
    first, second = FakeVllm(), FakeVllm()
    add_adapter(settings, engines(first, second), adapter)
    assert "support" in first.cards and "support" in second.cards
    assert "/v1/completions" in first.calls and "/v1/completions" in second.calls
    assert read_adapters(settings.adapters_file) == [adapter]

    remove_adapter(settings, engines(first, second), "support")
    assert "support" not in first.cards and "support" not in second.cards
    assert read_adapters(settings.adapters_file) == []


def test_a_200_that_loaded_nothing_is_a_failure_and_is_undone(tmp_path):
    settings = settings_for(tmp_path)
    adapter = Adapter("support", str(make_adapter(tmp_path / "support")), "chat")
    honest, liar = FakeVllm(), FakeVllm(lying=True)
    with pytest.raises(AdapterFailed, match="answered 200 but does not list 'support'"):
        add_adapter(settings, engines(honest, liar), adapter)
    assert "support" not in honest.cards
    assert read_adapters(settings.adapters_file) == []


def test_engines_started_without_lora_need_a_restart(tmp_path):
    settings = settings_for(tmp_path)
    adapter = Adapter("support", str(make_adapter(tmp_path / "support")), "chat")
    with pytest.raises(AdapterFailed, match=r"without LoRA.*restart") as caught:
        add_adapter(settings, engines(FakeVllm(lora=False)), adapter)
    assert caught.value.exit_code == EXIT_NO_LORA
    assert read_adapters(settings.adapters_file) == []


def test_an_unknown_base_model_is_refused(tmp_path):
    settings = settings_for(tmp_path)
    adapter = Adapter("support", str(make_adapter(tmp_path / "support")), "nope")
    with pytest.raises(AdapterFailed, match="no engine serves a model named 'nope'"):
        add_adapter(settings, engines(FakeVllm()), adapter)


def test_a_relative_local_source_is_recorded_as_an_absolute_path(tmp_path, monkeypatch):
    settings = settings_for(tmp_path)
    make_adapter(tmp_path / "support")
    monkeypatch.chdir(tmp_path)
    add_adapter(settings, engines(FakeVllm()), Adapter("support", "support", "chat"))
    assert read_adapters(settings.adapters_file)[0].source == str(tmp_path / "support")
