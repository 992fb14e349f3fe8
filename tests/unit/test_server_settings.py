"""Engine settings from the environment and the env file, and the internal key kept there."""

import stat

import pytest
from pydantic import ValidationError

from server.internal_key import KeyFileError, ensure_internal_key
from server.settings import EngineSettings, env_file_path, load_settings


def test_defaults_bind_loopback_and_size_automatically(monkeypatch):
    for name in ("APPLIANCE_ENGINE_HOST", "APPLIANCE_TENSOR_PARALLEL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    settings = EngineSettings(_env_file=None)
    assert (settings.engine_host, settings.engine_port) == ("127.0.0.1", 8000)
    assert settings.tensor_parallel_size == "auto"
    assert settings.engine_api_key == ""


def test_env_file_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    env_file = tmp_path / "appliance.env"
    env_file.write_text(
        "APPLIANCE_MODEL=/srv/m\nAPPLIANCE_TENSOR_PARALLEL_SIZE=4\n"
        "APPLIANCE_MAX_MODEL_LEN=\nAPPLIANCE_ENGINE_EXTRA_ARGS=--seed 1\n"
    )
    monkeypatch.setenv("APPLIANCE_ENV_FILE", str(env_file))
    monkeypatch.setenv("APPLIANCE_TENSOR_PARALLEL_SIZE", "2")
    assert env_file_path() == env_file
    settings = load_settings()
    assert settings.model == "/srv/m"
    assert settings.tensor_parallel_size == 2
    assert settings.max_model_len is None
    assert settings.extra_args == ["--seed", "1"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("tensor_parallel_size", 0),
        ("tensor_parallel_size", "some"),
        ("gpu_memory_utilization", 1.5),
        ("engine_port", 70000),
        ("engine_extra_args", "--chat-template 'unterminated"),
    ],
)
def test_bad_values_are_refused(name, value):
    with pytest.raises(ValidationError):
        EngineSettings(_env_file=None, **{name: value})


def test_key_is_generated_into_a_new_private_file(tmp_path):
    env_file = tmp_path / "appliance.env"
    key = ensure_internal_key(env_file)
    assert len(key) >= 40
    assert env_file.read_text() == f"APPLIANCE_ENGINE_API_KEY={key}\n"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert EngineSettings(_env_file=env_file).engine_api_key == key


def test_key_replaces_an_empty_assignment_and_keeps_the_rest(tmp_path):
    env_file = tmp_path / "appliance.env"
    env_file.write_text("# operator settings\nAPPLIANCE_MODEL=/srv/m\nAPPLIANCE_ENGINE_API_KEY=\n")
    env_file.chmod(0o640)
    key = ensure_internal_key(env_file)
    assert env_file.read_text().splitlines() == [
        "# operator settings",
        "APPLIANCE_MODEL=/srv/m",
        f"APPLIANCE_ENGINE_API_KEY={key}",
    ]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    assert ensure_internal_key(tmp_path / "other.env") != key


def test_unwritable_env_file_is_a_clear_error(tmp_path):
    with pytest.raises(KeyFileError, match="APPLIANCE_ENGINE_API_KEY is not set"):
        ensure_internal_key(tmp_path / "missing-dir" / "appliance.env")
