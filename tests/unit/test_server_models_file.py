"""The models file: TOML text -> model specs, every mistake named by model and key."""

from pathlib import Path

import pytest

from server.models_file import (
    ModelsFileError,
    ModelSpec,
    model_specs,
    parse_models,
    single_model_spec,
)
from server.settings import EngineSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "server" / "models.example.toml"


def base(**values) -> EngineSettings:
    return EngineSettings(_env_file=None, **values)


def errors_of(text: str, settings: EngineSettings | None = None) -> list[str]:
    with pytest.raises(ModelsFileError) as caught:
        parse_models(text, settings or base(), origin="models.toml")
    return caught.value.errors


def test_the_example_file_parses():
    chat, embeddings = parse_models(EXAMPLE.read_text(), base())
    assert (chat.name, chat.source, chat.replicas, chat.task) == (
        "chat", "meta-llama/Llama-3.1-8B-Instruct", "auto", "generate")
    assert (chat.settings.max_model_len, chat.settings.max_num_seqs) == (32768, 128)
    assert chat.settings.tensor_parallel_size == "auto"
    assert (embeddings.task, embeddings.replicas) == ("embed", 1)
    assert embeddings.settings.extra_args == ["--max-num-batched-tokens", "16384"]
    assert embeddings.overrides == {"engine_extra_args"}


def test_a_models_key_overrides_the_environment_for_that_model_only():
    text = """
        [[models]]
        name = "a"
        source = "/models/a"
        max_num_seqs = 16
        gpu_memory_utilization = 0.5

        [[models]]
        name = "b"
        source = "/models/b"
    """
    a, b = parse_models(text, base(max_num_seqs=64, max_model_len=4096))
    assert (a.settings.max_num_seqs, a.settings.gpu_memory_utilization) == (16, 0.5)
    assert (b.settings.max_num_seqs, b.settings.gpu_memory_utilization) == (64, 0.9)
    assert a.settings.max_model_len == b.settings.max_model_len == 4096
    assert (a.settings.model, a.settings.served_model_name) == ("/models/a", "a")
    assert (a.replicas, a.task, a.overrides) == (1, "generate",
                                                 {"max_num_seqs", "gpu_memory_utilization"})


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('replicas = 0', "models.toml: model 'm': key 'replicas': a number of at least 1, or "
                         '"auto" (got 0)'),
        ('replicas = true', "models.toml: model 'm': key 'replicas': a number of at least 1, "
                            'or "auto" (got True)'),
        ('task = "chat"', "models.toml: model 'm': key 'task': \"generate\" or \"embed\" "
                          "(got 'chat')"),
        ('max_num_seqs = 0', "models.toml: model 'm': key 'max_num_seqs': Input should be "
                             "greater than or equal to 1 (got 0)"),
        ('gpu_memory_utilization = 1.5', "models.toml: model 'm': key "
                                         "'gpu_memory_utilization': Input should be less "
                                         "than or equal to 1 (got 1.5)"),
        ('tensor_parallel_size = "most"', "models.toml: model 'm': key "
                                          "'tensor_parallel_size': Input should be 'auto' or "
                                          "Input should be a valid integer"),
        ('max_model_length = 4096', "models.toml: model 'm': unknown key 'max_model_len"
                                    "gth' (did you mean 'max_model_len'?)"),
        ('engine_port = 9000', "models.toml: model 'm': key 'engine_port' is the host's, not "
                               "a model's: set APPLIANCE_ENGINE_PORT in the environment"),
        ('engine_extra_args = "--x \'open"', "models.toml: model 'm': key "
                                             "'engine_extra_args': Value error, No closing "
                                             "quotation"),
    ],
)
def test_a_bad_key_is_named_with_its_model(table, error):
    (found,) = errors_of(f'[[models]]\nname = "m"\nsource = "/models/m"\n{table}\n')
    assert found.startswith(error)


def test_every_mistake_is_reported_at_once():
    text = """
        [[models]]
        name = "chat"
        source = "/models/a"

        [[models]]
        name = "chat"
        source = "/models/b"
        quantisation = "awq"

        [[models]]
        source = "/models/c"

        [[models]]
        name = "embed"
    """
    assert errors_of(text) == [
        "models.toml: model 'chat': unknown key 'quantisation' (did you mean 'quantization'?)",
        "models.toml: model 'chat': the name is taken by [[models]] #1 already: each model "
        "needs a name of its own",
        "models.toml: [[models]] #3: key 'name': a served name without spaces is required "
        "(got None)",
        "models.toml: model 'embed': key 'source': a directory, a Hugging Face id or an s3:// "
        "prefix is required (got None)",
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("models = [", "models.toml is not valid TOML: "),
        ("", "models.toml names no models: add a [[models]] table"),
        ('model = "x"\n[[models]]\nname = "m"\nsource = "/m"',
         "models.toml: unknown top-level key 'model' (only [[models]] tables belong here)"),
        ('models = ["a"]', "models.toml: models must be [[models]] tables"),
    ],
)
def test_a_file_that_is_not_a_models_file_is_refused(text, error):
    assert errors_of(text)[0].startswith(error)


def test_without_a_models_file_appliance_model_is_the_one_model(tmp_path):
    settings = base(model="Qwen/Qwen2.5-7B-Instruct", models_file=tmp_path / "absent.toml",
                    tensor_parallel_size=2)
    specs, why = model_specs(settings)
    assert specs == [single_model_spec(settings)]
    (only,) = specs
    assert (only.name, only.source, only.replicas, only.task) == (
        "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", 1, "generate")
    assert only.settings is settings
    assert "there is no models file" in why


def test_the_models_file_wins_over_appliance_model_and_says_so(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "m"\nsource = "/models/m"\n')
    specs, why = model_specs(base(model="/models/other", models_file=path))
    assert [s.name for s in specs] == ["m"]
    assert why == f"1 model(s) from {path}; APPLIANCE_MODEL=/models/other is ignored"


def test_no_models_file_and_no_model_is_an_error(tmp_path):
    with pytest.raises(ModelsFileError, match="no model configured"):
        model_specs(base(models_file=tmp_path / "absent.toml"))


def test_the_setting_defaults_to_etc_appliance():
    assert base().models_file == Path("/etc/appliance/models.toml")
    assert isinstance(single_model_spec(base(model="/m")), ModelSpec)
