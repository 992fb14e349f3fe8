"""appliance-firstboot's pure parts: reading user data, merging settings, writing env lines."""

import shlex
from pathlib import Path

import pytest
from dotenv import dotenv_values

from appliance_ops import firstboot


def test_user_data_takes_appliance_settings_and_aliases():
    parsed = firstboot.parse_user_data(
        "# launch settings\n"
        "APPLIANCE_MODEL=Qwen/Qwen2.5-7B-Instruct\n"
        "export APPLIANCE_MAX_INFLIGHT=64\n"
        "DOMAIN=api.example.com\n"
        "EMAIL='ops@example.com'\n"
        'APPLIANCE_ENGINE_EXTRA_ARGS="--max-num-batched-tokens 8192"  # tuning\n'
    )
    assert parsed.settings == {
        "APPLIANCE_MODEL": "Qwen/Qwen2.5-7B-Instruct",
        "APPLIANCE_MAX_INFLIGHT": "64",
        "APPLIANCE_DOMAIN": "api.example.com",
        "APPLIANCE_EMAIL": "ops@example.com",
        "APPLIANCE_ENGINE_EXTRA_ARGS": "--max-num-batched-tokens 8192",
    }
    assert parsed.ignored == []


def test_user_data_ignores_other_lines_by_name_only():
    parsed = firstboot.parse_user_data(
        "#!/bin/bash\nPATH=/evil\nAWS_SECRET=hunter2\nnot a setting\nAPPLIANCE_X='unbalanced\n"
    )
    assert parsed.settings == {}
    assert "hunter2" not in " ".join(parsed.ignored)
    assert len(parsed.ignored) == 4


def test_user_data_wins_file_keeps_rest_and_secrets_are_never_replaced():
    merged = firstboot.merge_settings(
        defaults={"APPLIANCE_MODEL": "baked/model", "APPLIANCE_DEVICE": "gpu"},
        existing={
            "APPLIANCE_ENGINE_API_KEY": "old-key",
            "APPLIANCE_LOG_LEVEL": "debug",
            "APPLIANCE_DEVICE": "auto",
        },
        user={"APPLIANCE_LOG_LEVEL": "info"},
        generated={"APPLIANCE_ENGINE_API_KEY": "new-key"},
    )
    assert merged == {
        "APPLIANCE_MODEL": "baked/model",
        "APPLIANCE_DEVICE": "auto",
        "APPLIANCE_ENGINE_API_KEY": "old-key",
        "APPLIANCE_LOG_LEVEL": "info",
    }


def test_generated_secret_fills_an_empty_value():
    merged = firstboot.merge_settings(
        {}, {"APPLIANCE_ENGINE_API_KEY": ""}, {}, {"APPLIANCE_ENGINE_API_KEY": "new"}
    )
    assert merged["APPLIANCE_ENGINE_API_KEY"] == "new"


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "",
        "with space",
        "it's",
        'say "hi"',
        "back\\slash",
        "$HOME",
        "a#b",
        "--x 'a b'",
        "  padded  ",
    ],
)
def test_env_lines_read_back_unchanged_by_dotenv_and_shell_rules(value, tmp_path):
    text = firstboot.render_env({"APPLIANCE_X": value})
    env = tmp_path / "env"
    env.write_text(text)
    assert dotenv_values(env, interpolate=False)["APPLIANCE_X"] == value
    assert firstboot.parse_env_file(text)["APPLIANCE_X"] == value
    line = next(line for line in text.splitlines() if line.startswith("APPLIANCE_X="))
    assert shlex.split(line.partition("=")[2]) in ([value], [])


def test_multi_line_values_are_refused():
    with pytest.raises(ValueError):
        firstboot.render_env({"APPLIANCE_X": "a\nb"})


def test_public_tls_needs_domain_and_email():
    assert firstboot.wants_public_tls(
        {"APPLIANCE_DOMAIN": "a.example.com", "APPLIANCE_EMAIL": "o@example.com"}
    )
    assert not firstboot.wants_public_tls({"APPLIANCE_DOMAIN": "a.example.com"})


def test_the_admin_key_goes_to_the_local_file_or_per_instance_into_a_fleets_store():
    state = Path("/var/lib/appliance")
    assert firstboot.admin_key_target({}, state, "admin", "i-0abc") == (
        "/var/lib/appliance/keys.db", "admin")
    assert firstboot.admin_key_target({"APPLIANCE_KEYS_DB": "/srv/k.db"}, state, "admin",
                                      "i-0abc") == ("/srv/k.db", "admin")
    url = "postgresql://appliance@db.internal/appliance"
    assert firstboot.admin_key_target({"APPLIANCE_KEYS_URL": url}, state, "admin", "i-0abc") == (
        url, "admin-i-0abc")


def test_a_cluster_node_opens_the_firewall_to_its_subnet_only():
    node = {"APPLIANCE_NODE_ROLE": "worker", "APPLIANCE_CLUSTER_CIDR": "10.0.1.7/24"}
    assert firstboot.cluster_firewall_rule(node) == [
        "allow", "from", "10.0.1.0/24", "comment", "appliance cluster (Ray, NCCL)"]
    assert firstboot.cluster_firewall_rule({"APPLIANCE_CLUSTER_CIDR": "10.0.1.0/24"}) is None
    assert firstboot.cluster_firewall_rule({"APPLIANCE_NODE_ROLE": "head"}) is None
    for bad in ("0.0.0.0/0", "not-a-net"):
        with pytest.raises(ValueError):
            firstboot.cluster_firewall_rule({**node, "APPLIANCE_CLUSTER_CIDR": bad})
