"""proxy/protocol/models.py: the public model list, one model's object, and the per-key filter."""

import json

import pytest

from proxy.protocol.errors import ProxyError
from proxy.protocol.models import models_answer, one_model, public_models

# vLLM 0.32's /v1/models, as served for the tiny model.
ENGINE_LIST = {
    "object": "list",
    "data": [
        {"id": "tiny", "object": "model", "created": 1795563359, "owned_by": "vllm",
         "root": "/srv/models/tiny-model", "parent": None, "max_model_len": 1024,
         "permission": [{"id": "modelperm-a2", "object": "model_permission"}]},
        {"id": "tiny-lora", "object": "model", "created": 1795563359, "owned_by": "vllm",
         "root": "/srv/adapters/lora", "parent": "tiny", "max_model_len": 1024},
    ],
}


def test_no_server_path_leaves_the_box():
    listed = public_models(ENGINE_LIST)
    assert [m["id"] for m in listed["data"]] == ["tiny", "tiny-lora"]
    assert "/srv" not in repr(listed)
    assert listed["data"][1]["parent"] == "tiny"
    assert listed["data"][0]["max_model_len"] == 1024


def test_a_path_in_parent_is_hidden_too():
    engine = {"data": [{"id": "m", "object": "model", "parent": "/srv/base"}]}
    assert public_models(engine)["data"][0]["parent"] is None


def test_allowed_models_narrow_the_list():
    assert [m["id"] for m in public_models(ENGINE_LIST, {"tiny-lora"})["data"]] == ["tiny-lora"]
    assert public_models(ENGINE_LIST, set())["data"] == []


def test_one_model_is_answered_from_the_list():
    model = one_model(ENGINE_LIST, "tiny")
    assert model["id"] == "tiny" and model["object"] == "model" and "root" not in model


@pytest.mark.parametrize(("model_id", "allowed"), [("gpt-4o", None), ("tiny", {"tiny-lora"})])
def test_unknown_or_not_allowed_model_is_404_model_not_found(model_id, allowed):
    with pytest.raises(ProxyError) as caught:
        one_model(ENGINE_LIST, model_id, allowed)
    error = caught.value.payload()["error"]
    assert caught.value.status == 404
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error",
                                                              "model_not_found", "model")


def test_odd_engine_answers_give_an_empty_list():
    for payload in (None, [], {"data": None}, {"data": [1, {"no": "id"}]}):
        assert public_models(payload) == {"object": "list", "data": []}


def test_routes_answer_from_the_engines_list_bytes():
    content = json.dumps(ENGINE_LIST).encode()
    assert json.loads(models_answer("/v1/models", content))["data"][0]["id"] == "tiny"
    assert json.loads(models_answer("/v1/models/tiny-lora", content))["parent"] == "tiny"
    hf = {"data": [{"id": "Qwen/Qwen2.5-7B-Instruct", "object": "model"}]}
    assert json.loads(models_answer("/v1/models/Qwen/Qwen2.5-7B-Instruct",
                                    json.dumps(hf).encode()))["id"] == "Qwen/Qwen2.5-7B-Instruct"
