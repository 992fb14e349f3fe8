#!/usr/bin/env python3
"""The settings tables in docs/, written from the pydantic settings classes themselves.

Each class documents its fields with a docstring under the field; this script reads those
docstrings from the class's source (with ``ast``: pydantic keeps no attribute docstrings
unless ``use_attribute_docstrings`` is on, and the classes are not changed for the docs) and
writes one table per class between two marker comments in the guide it belongs to:

    <!-- settings:proxy begin -->
    ...
    <!-- settings:proxy end -->

    scripts/settings_docs.py           rewrite the tables
    scripts/settings_docs.py --check   exit 1 with a diff when the docs differ from the code
"""

import argparse
import ast
import difflib
import importlib
import inspect
import itertools
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Table:
    name: str
    """The marker's name: ``<!-- settings:NAME begin -->``."""
    module: str
    cls: str
    doc: str
    """The guide holding the table, relative to the repository root."""


TABLES = (
    Table("proxy", "proxy.settings", "ProxySettings", "docs/gateway.md"),
    Table("engine", "server.settings", "EngineSettings", "docs/engine.md"),
    Table("ops", "appliance_ops.settings", "OpsSettings", "docs/operating.md"),
)


def settings_class(table: Table) -> type[BaseSettings]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return getattr(importlib.import_module(table.module), table.cls)


def env_name(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """The variable pydantic-settings reads: an alias as given, else the prefix plus the name."""
    if isinstance(field.validation_alias, str):
        alias = field.validation_alias
    elif field.alias:
        alias = field.alias
    else:
        alias = cls.model_config.get("env_prefix", "") + name
    return alias if cls.model_config.get("case_sensitive") else alias.upper()


def attribute_docstrings(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right after its annotated assignment."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = after.value.value
    return docs


def markdown(text: str, env_names: dict[str, str]) -> str:
    """A docstring as one table cell: one line, reST literals as Markdown code (a field's name
    as the variable a reader sets), pipes escaped."""
    text = " ".join(inspect.cleandoc(text).split())
    text = re.sub(r"``(.+?)``", lambda m: f"`{env_names.get(m[1], m[1])}`", text)
    return text.replace("|", "\\|")


LOWER = {annotated_types.Ge: ("ge", "≥", "≤"), annotated_types.Gt: ("gt", ">", "<")}
UPPER = {annotated_types.Le: ("le", "≤"), annotated_types.Lt: ("lt", "<")}


def number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def constraints(metadata: list) -> list:
    """pydantic's constraint objects, with those inside a nested ``Field(...)`` taken out."""
    flat = []
    for item in metadata:
        flat.extend(constraints(item.metadata) if isinstance(item, FieldInfo) else [item])
    return flat


def bounded(base: str, metadata: list) -> str:
    """``int ≥ 1``, ``float > 0``, ``1 ≤ int ≤ 65535``: the type and its bounds."""
    lower = upper = None
    for item in constraints(metadata):
        for kind, (attr, sign, flipped) in LOWER.items():
            if isinstance(item, kind):
                lower = (number(getattr(item, attr)), sign, flipped)
        for kind, (attr, sign) in UPPER.items():
            if isinstance(item, kind):
                upper = (number(getattr(item, attr)), sign)
    if lower and upper:
        return f"{lower[0]} {lower[2]} {base} {upper[1]} {upper[0]}"
    if lower:
        return f"{base} {lower[1]} {lower[0]}"
    if upper:
        return f"{base} {upper[1]} {upper[0]}"
    return base


def type_name(annotation: object, metadata: list = ()) -> str:
    """How a reader writes the value: ``int ≥ 1``, ``auto`` or ``int ≥ 1``, ``path``, ..."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        return type_name(inner, [*metadata, *extra])
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return bounded(" or ".join(parts), list(metadata))
    if origin is typing.Literal:
        return " or ".join(f"`{value}`" for value in typing.get_args(annotation))
    if annotation is Path:
        return "path"
    name = getattr(annotation, "__name__", str(annotation))
    return bounded(name, list(metadata))


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{number(value)}`"


def render(table: Table) -> str:
    cls = settings_class(table)
    docs = attribute_docstrings(cls)
    source = Path(inspect.getfile(cls)).relative_to(ROOT)
    link = Path("../" * len(Path(table.doc).parent.parts)) / source
    lines = [
        f"Generated from [`{source}`]({link.as_posix()})'s `{table.cls}` by"
        " `scripts/settings_docs.py`: edit the docstrings there, then run it.",
        "",
        "| variable | type | default | meaning |",
        "|---|---|---|---|",
    ]
    env_names = {name: env_name(cls, name, field) for name, field in cls.model_fields.items()}
    for name, field in cls.model_fields.items():
        meaning = markdown(field.description or docs.get(name, ""), env_names)
        kind = type_name(field.annotation, field.metadata)
        lines.append(f"| `{env_names[name]}` | {kind} | {default_text(field)} | {meaning} |")
    return "\n".join(lines)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- settings:{name} begin -->", f"<!-- settings:{name} end -->"


def updated(text: str, table: Table) -> str:
    begin, end = markers(table.name)
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"{table.doc}: expected one {begin} ... {end} region")
    return pattern.sub(lambda _: f"{begin}\n{render(table)}\n\n{end}", text)


def documents() -> dict[Path, tuple[str, str]]:
    """Each guide's text as it is and as the code would write it."""
    texts: dict[Path, tuple[str, str]] = {}
    for table in TABLES:
        path = ROOT / table.doc
        now, new = texts.get(path, (path.read_text(), path.read_text()))
        texts[path] = (now, updated(new, table))
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 and print a diff when the docs are stale")
    args = parser.parse_args(argv)
    stale = 0
    for path, (now, new) in documents().items():
        if now == new:
            continue
        stale += 1
        if args.check:
            rel = path.relative_to(ROOT).as_posix()
            sys.stdout.writelines(difflib.unified_diff(
                now.splitlines(keepends=True), new.splitlines(keepends=True),
                f"a/{rel}", f"b/{rel}"))
        else:
            path.write_text(new)
            print(f"rewrote {path.relative_to(ROOT)}", file=sys.stderr)
    if args.check and stale:
        print("settings tables out of date: run scripts/settings_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
