"""The gateway's OpenAPI description (``proxy/openapi_gateway.json``) against the route table:
a route the table serves but the description leaves out is one no client generator, doc page
or schemathesis run (``tests/integration/test_fuzz.py``) ever sees."""

import json
import re

from proxy.app import GATEWAY_OPENAPI
from proxy.protocol.routes import MODEL, ROUTES, WITH_ID, Route

UNDESCRIBED = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
"""Audio uploads: their multipart body (an audio file plus the engine's many form fields) is
passed to the engine unread, so a description would be vLLM's, not the gateway's, and a fuzzer
sending random bytes as audio would grade the fake engine, not the gateway."""

JSON_OR_FORM = frozenset({"application/json", "multipart/form-data"})


def described() -> dict:
    return json.loads(GATEWAY_OPENAPI.read_text())


def template(path: str) -> str:
    """A path with its parameters unnamed: ``/v1/files/{file_id}`` and the table's
    ``/v1/files/{id}`` are the same route."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def table() -> list[Route]:
    return [*ROUTES.values(), *WITH_ID, MODEL]


def test_every_route_of_the_table_is_described_with_its_methods():
    paths = {template(path): item for path, item in described()["paths"].items()}
    missing = {}
    for route in table():
        if route.path in UNDESCRIBED:
            continue
        item = paths.get(template(route.path), {})
        absent = [m for m in route.methods if m.lower() not in item]
        if absent:
            missing[route.path] = absent
    assert not missing, f"routes of the table the OpenAPI description lacks: {missing}"


def test_the_description_names_no_route_or_method_the_table_lacks():
    served = {template(route.path): {m.lower() for m in route.methods} for route in table()}
    for path, item in described()["paths"].items():
        methods = {m for m in item if m in {"get", "post", "put", "patch", "delete"}}
        assert methods <= served.get(template(path), set()), path


def test_bodies_are_json_or_multipart_and_every_operation_needs_a_key():
    for path, item in described()["paths"].items():
        for method, operation in item.items():
            assert operation["security"] == [{"apiKey": []}], (method, path)
            body = operation.get("requestBody")
            if body is not None:
                assert set(body["content"]) <= JSON_OR_FORM, (method, path)


def test_undescribed_routes_are_still_in_the_table():
    assert set(ROUTES) >= UNDESCRIBED
