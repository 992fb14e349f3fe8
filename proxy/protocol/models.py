"""Pure: the engine's model list -> what a client may see of it.

vLLM's ``/v1/models`` names the model's directory on the server in ``root``: no file system
path leaves the box. The gateway answers both routes itself from what every engine listed
(``relay.engines``): vLLM has no ``/v1/models/{id}``; OpenAI has. ``allowed`` narrows the
list to the models a key may use (None: all of them).
"""

import json
from collections.abc import Collection

from .errors import model_not_found

HIDDEN_FIELDS = ("root",)
LIST_ROUTE = "/v1/models"
ONE_PREFIX = "/v1/models/"


def is_models_route(path: str) -> bool:
    return path == LIST_ROUTE or path.startswith(ONE_PREFIX)


def public_model(model: dict) -> dict:
    """One model object without server-side paths (``parent`` too, should it hold one)."""
    shown = {k: v for k, v in model.items() if k not in HIDDEN_FIELDS}
    parent = shown.get("parent")
    if isinstance(parent, str) and parent.startswith(("/", ".", "~", "s3://")):
        shown["parent"] = None
    return shown


def public_models(payload: object, allowed: Collection[str] | None = None) -> dict:
    """The list a client sees: only allowed models, none with a path in it."""
    data = payload.get("data") if isinstance(payload, dict) else None
    models = [m for m in data or () if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if allowed is not None:
        models = [m for m in models if m["id"] in allowed]
    return {"object": "list", "data": [public_model(m) for m in models]}


def one_model(payload: object, model_id: str, allowed: Collection[str] | None = None) -> dict:
    """``GET /v1/models/{id}``: the model's object, or OpenAI's 404 ``model_not_found``."""
    for model in public_models(payload, allowed)["data"]:
        if model["id"] == model_id:
            return model
    raise model_not_found(model_id)


def models_answer(path: str, content: bytes, allowed: Collection[str] | None = None) -> bytes:
    """The client's answer for a models route, from the engine's list (``content``)."""
    try:
        payload = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if path == LIST_ROUTE:
        return json.dumps(public_models(payload, allowed)).encode()
    return json.dumps(one_model(payload, path.removeprefix(ONE_PREFIX), allowed)).encode()
