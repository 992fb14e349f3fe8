"""Gateway settings: environment over env file, the env file named by APPLIANCE_ENV_FILE."""

import pytest
from pydantic import ValidationError

from proxy.settings import ProxySettings, load_settings


def test_env_file_is_read_and_environment_wins(tmp_path, monkeypatch):
    env_file = tmp_path / "appliance.env"
    env_file.write_text("APPLIANCE_ENGINE_URL=http://127.0.0.1:9001\n"
                        "APPLIANCE_MAX_QUEUED_PER_KEY=7\n")
    monkeypatch.setenv("APPLIANCE_ENV_FILE", str(env_file))
    monkeypatch.setenv("APPLIANCE_MAX_QUEUED_PER_KEY", "9")
    settings = load_settings()
    assert settings.engine_url == "http://127.0.0.1:9001"
    assert settings.max_queued_per_key == 9


def test_unreadable_or_missing_env_file_leaves_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_ENV_FILE", str(tmp_path / "absent.env"))
    monkeypatch.delenv("APPLIANCE_ENGINE_URL", raising=False)
    assert load_settings().engine_url == "http://127.0.0.1:8000"


def test_admission_defaults_follow_the_engines_batch_size(monkeypatch):
    monkeypatch.setenv("APPLIANCE_MAX_NUM_SEQS", "8")
    monkeypatch.setenv("APPLIANCE_MAX_QUEUED_PER_KEY", "16")
    settings = load_settings()
    assert settings.engine_concurrency == 8
    assert settings.max_inflight > settings.engine_concurrency + settings.max_queued_per_key


@pytest.mark.parametrize(
    ("urls", "error"),
    [
        ({"limits_url": "redis://cache:6379/0"}, "set APPLIANCE_KEYS_URL"),
        ({"keys_url": "/var/lib/appliance/keys.db"}, "must be a postgresql:// URL"),
        ({"keys_url": "postgresql://db/a", "limits_url": "cache:6379"}, "redis://"),
    ],
)
def test_fleet_stores_are_urls_and_shared_limits_need_a_shared_key_store(urls, error):
    with pytest.raises(ValidationError, match=error):
        ProxySettings(_env_file=None, **urls)
    ProxySettings(_env_file=None, keys_url="postgresql://db/a", limits_url="redis://cache/0")
