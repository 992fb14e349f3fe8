"""proxy/protocol/engine_errors.py: vLLM's error answers (captured from vLLM 0.32), as OpenAI's."""

import json

import pytest

from proxy.protocol.engine_errors import engine_error, stream_errors

OPENAI_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
                "not_found_error", "rate_limit_error", "server_error"}

CONTEXT = (b'{"error":{"message":"This model\'s maximum context length is 1024 tokens. However, '
           b'your prompt contains at least 1025 input tokens, which exceeds this limit even '
           b'without any output tokens. Please reduce the length of the input prompt. '
           b'(parameter=input_tokens, value=1025)","type":"BadRequestError",'
           b'"param":"input_tokens","code":400}}')
NO_MODEL = (b'{"error":{"message":"The model `nope` does not exist. Valid aliases: tiny.",'
            b'"type":"NotFoundError","param":"model","code":404}}')
RESPONSES_VALIDATION = (
    b'{"error":{"message":"1 validation error:\\n  {\'type\': \'int_parsing\', \'loc\': '
    b'\'body.max_output_tokens\', \'msg\': \'Input should be a valid integer, unable to parse '
    b'string as an integer\', \'input\': \'ten\'}","type":"Bad Request",'
    b'"param":"body.max_output_tokens","code":400}}')
MISSING_FIELD = (
    b'{"error":{"message":"1 validation error:\\n  {\'type\': \'missing\', \'loc\': '
    b'\'body.messages\', \'msg\': \'Field required\', \'input\': {}}","type":"Bad Request",'
    b'"param":"body.messages","code":400}}')
TOO_MANY_TOKENS = (b'{"error":{"message":"max_tokens=5000 cannot be greater than max_model_len='
                   b'1024. Please request fewer output tokens. (parameter=max_tokens, value=5000)'
                   b'","type":"BadRequestError","param":"max_tokens","code":400}}')
TEMPERATURE = (b'{"error":{"message":"temperature must be non-negative, got -3.0. (parameter='
               b'temperature, value=-3.0)","type":"BadRequestError","param":"temperature",'
               b'"code":400}}')
FASTAPI_404 = b'{"detail":"Not Found"}'


def normalised(status, content, method="POST", path="/v1/chat/completions"):
    err = engine_error(status, content, method, path)
    new_status, error = err.status, json.loads(err.body())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] in OPENAI_TYPES
    assert error["code"] is None or isinstance(error["code"], str)
    return new_status, error


@pytest.mark.parametrize(
    ("status", "content", "path", "kind", "code", "param"),
    [
        (400, CONTEXT, "/v1/chat/completions", "invalid_request_error",
         "context_length_exceeded", "messages"),
        (400, CONTEXT, "/v1/completions", "invalid_request_error",
         "context_length_exceeded", "prompt"),
        (404, NO_MODEL, "/v1/chat/completions", "invalid_request_error", "model_not_found",
         "model"),
        (400, RESPONSES_VALIDATION, "/v1/responses", "invalid_request_error", "invalid_type",
         "max_output_tokens"),
        (400, MISSING_FIELD, "/v1/chat/completions", "invalid_request_error",
         "missing_required_parameter", "messages"),
        (400, TOO_MANY_TOKENS, "/v1/chat/completions", "invalid_request_error",
         "invalid_value", "max_tokens"),
        (400, TEMPERATURE, "/v1/completions", "invalid_request_error", "invalid_value",
         "temperature"),
        (404, FASTAPI_404, "/v1/embeddings", "not_found_error", "not_found", None),
        (500, b'{"error":{"message":"boom","type":"InternalServerError","param":null,'
              b'"code":500}}', "/v1/completions", "server_error", "internal_error", None),
        (503, b"upstream overloaded", "/v1/completions", "server_error", "engine_unavailable",
         None),
        (422, b'{"detail":[{"type":"missing","loc":["body","model"],"msg":"Field required"}]}',
         "/v1/completions", "invalid_request_error", "missing_required_parameter", "model"),
    ],
)
def test_engine_errors_get_openai_type_code_and_param(status, content, path, kind, code, param):
    new_status, error = normalised(status, content, path=path)
    assert new_status == status
    assert (error["type"], error["code"], error["param"]) == (kind, code, param)
    assert error["message"]


def test_helpful_engine_messages_are_kept_and_pydantic_dumps_are_not():
    assert "maximum context length is 1024" in normalised(400, CONTEXT)[1]["message"]
    assert "`nope` does not exist" in normalised(404, NO_MODEL)[1]["message"]
    message = normalised(400, RESPONSES_VALIDATION, path="/v1/responses")[1]["message"]
    assert message == "Invalid 'max_output_tokens': Input should be a valid integer, unable to " \
                      "parse string as an integer."


def test_fastapi_not_found_names_the_route_like_openai():
    _, error = normalised(404, FASTAPI_404, "GET", "/v1/models/tiny")
    assert error["message"].startswith("Invalid URL (GET /v1/models/tiny)")


def test_the_engine_refusing_the_internal_key_is_not_the_clients_fault():
    status, error = normalised(401, b'{"error":"Unauthorized"}')
    assert status == 502 and error["type"] == "server_error"
    assert error["code"] == "engine_auth_failed"


def test_string_codes_already_in_openai_style_are_kept():
    body = b'{"error":{"message":"slow down","type":"x","param":null,"code":"custom_code"}}'
    assert normalised(429, body)[1]["code"] == "custom_code"
    assert normalised(429, body)[1]["type"] == "rate_limit_error"


def test_empty_or_odd_bodies_still_give_a_message():
    for content in (b"", b"[]", b"null", b"\xff\xfe"):
        _, error = normalised(500, content)
        assert error["message"]


def test_error_events_inside_a_stream_are_rewritten_and_others_kept():
    chunk = b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}]}'
    failure = (b'data: {"error":{"message":"Grammar failed","type":"BadRequestError",'
               b'"param":null,"code":400}}')
    events = chunk + b"\n\n" + failure + b"\n\ndata: [DONE]\n\n"
    out = stream_errors(events).split(b"\n\n")
    assert out[0] == chunk and out[2] == b"data: [DONE]"
    error = json.loads(out[1][len(b"data: "):])["error"]
    assert (error["type"], error["code"], error["message"]) == (
        "invalid_request_error", "invalid_request", "Grammar failed")
    assert stream_errors(b'data: {"error": 1}\n\n').startswith(b'data: {"error": {"message"')
