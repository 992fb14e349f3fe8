"""scripts/settings_docs.py: the settings tables in docs/ are the code's, field for field."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("settings_docs",
                                              ROOT / "scripts" / "settings_docs.py")
settings_docs = importlib.util.module_from_spec(spec)
sys.modules["settings_docs"] = settings_docs
spec.loader.exec_module(settings_docs)


def test_docs_match_the_settings_classes(capsys):
    assert settings_docs.main(["--check"]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("table", settings_docs.TABLES, ids=lambda t: t.name)
def test_every_field_has_a_row_in_its_guide(table):
    cls = settings_docs.settings_class(table)
    begin, end = settings_docs.markers(table.name)
    text = (ROOT / table.doc).read_text()
    region = text[text.index(begin):text.index(end)]
    rows = re.findall(r"^\| `(APPLIANCE_\w+)` \|", region, re.MULTILINE)
    assert rows == [f"APPLIANCE_{name.upper()}" for name in cls.model_fields]


def test_a_stale_table_fails_the_check_with_a_diff(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "docs" / "gateway.md"
    doc.parent.mkdir()
    begin, end = settings_docs.markers("proxy")
    doc.write_text(f"# Gateway\n\n{begin}\n| `APPLIANCE_GONE` | old |\n{end}\n")
    table = settings_docs.Table("proxy", "proxy.settings", "ProxySettings", "docs/gateway.md")
    monkeypatch.setattr(settings_docs, "TABLES", (table,))
    monkeypatch.setattr(settings_docs, "ROOT", tmp_path)
    monkeypatch.setattr(settings_docs, "render", lambda _: "| `APPLIANCE_NEW` | new |")

    assert settings_docs.main(["--check"]) == 1
    diff = capsys.readouterr().out
    assert "-| `APPLIANCE_GONE` | old |" in diff and "+| `APPLIANCE_NEW` | new |" in diff
    assert settings_docs.main([]) == 0
    assert settings_docs.main(["--check"]) == 0
    assert "APPLIANCE_GONE" not in doc.read_text()


class Example(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_")

    port: int = Field(8080, ge=1, le=65535)
    """Where it listens; ``other`` is named as its variable."""
    other: float | None = Field(None, gt=0)
    undocumented: bool = False


def test_a_row_takes_the_variable_type_default_and_docstring():
    docs = settings_docs.attribute_docstrings(Example)
    names = {name: settings_docs.env_name(Example, name, field)
             for name, field in Example.model_fields.items()}
    port, other = Example.model_fields["port"], Example.model_fields["other"]

    assert names["port"] == "APPLIANCE_PORT"
    assert settings_docs.type_name(port.annotation, port.metadata) == "1 ≤ int ≤ 65535"
    assert settings_docs.type_name(other.annotation, other.metadata) == "float > 0"
    assert settings_docs.default_text(port) == "`8080`"
    assert settings_docs.default_text(other) == "unset"
    assert settings_docs.markdown(docs["port"], names) == \
        "Where it listens; `APPLIANCE_OTHER` is named as its variable."
    assert "undocumented" not in docs
