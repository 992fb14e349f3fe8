"""Gateway settings: environment over env file, the env file named by APPLIANCE_ENV_FILE."""

from proxy.settings import load_settings


def test_env_file_is_read_and_environment_wins(tmp_path, monkeypatch):
    env_file = tmp_path / "appliance.env"
    env_file.write_text("APPLIANCE_ENGINE_URL=http://127.0.0.1:9001\nAPPLIANCE_MAX_INFLIGHT=7\n")
    monkeypatch.setenv("APPLIANCE_ENV_FILE", str(env_file))
    monkeypatch.setenv("APPLIANCE_MAX_INFLIGHT", "9")
    settings = load_settings()
    assert settings.engine_url == "http://127.0.0.1:9001"
    assert settings.max_inflight == 9


def test_unreadable_or_missing_env_file_leaves_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_ENV_FILE", str(tmp_path / "absent.env"))
    monkeypatch.delenv("APPLIANCE_ENGINE_URL", raising=False)
    assert load_settings().engine_url == "http://127.0.0.1:8000"
