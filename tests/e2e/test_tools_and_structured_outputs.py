"""Tool calling and structured outputs on the real engine, through the gateway.

The tiny model's chat template writes Hermes-style ``<tool_call>`` markup, so
``appliance-engine`` starts vLLM with ``--enable-auto-tool-choice --tool-call-parser hermes``.
Its random weights never write a tool call by chance, so the tests make it write one with a
regex constraint (vLLM's ``structured_outputs``): the parser, not the test, turns that text
into ``tool_calls``.
"""

import json
import re

from tests.e2e.engine_stack import SERVED_NAME

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
FORCE_CALL = {"structured_outputs": {"regex": re.escape(CALL_TEXT)}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_engine_chose_the_hermes_parser_from_the_template(vllm):
    log = vllm.log.read_text()
    assert "tool-call parser hermes" in log and "'<tool_call>'" in log
    assert "--enable-auto-tool-choice --tool-call-parser hermes" in log


def test_tools_with_auto_and_required_choice_are_accepted(gw):
    client = gw.client()
    for choice in ("auto", "required"):
        result = client.chat.completions.create(model=SERVED_NAME, messages=ASK, tools=[WEATHER],
                                                tool_choice=choice, max_tokens=4)
        assert result.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_tool_call_in_the_output_reaches_the_client_as_tool_calls(gw):
    result = gw.client().chat.completions.create(
        model=SERVED_NAME, messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=300,
        extra_body=FORCE_CALL)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert not choice.message.content


def test_streamed_tool_call_arrives_as_tool_call_deltas(gw):
    stream = gw.client().chat.completions.create(
        model=SERVED_NAME, messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=300,
        stream=True, extra_body=FORCE_CALL)
    names, arguments, finish = [], "", None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                if delta.function.name:
                    names.append(delta.function.name)
                arguments += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_tool_result_round_trip_is_accepted(gw):
    """An agent's second turn: the assistant's call and the tool's answer go back in."""
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    result = gw.client().chat.completions.create(model=SERVED_NAME, messages=history,
                                                 tools=[WEATHER], max_tokens=4)
    assert result.usage.prompt_tokens > 0


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                   "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def test_json_schema_response_format_gives_valid_json(gw):
    """Sampled with a seed: greedy decoding of random weights can loop on the whitespace the
    schema allows between fields, and never close the object."""
    result = gw.client().chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Is it sunny?"}],
        max_tokens=400, seed=1,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA,
                                         "strict": True}})
    assert result.choices[0].finish_reason == "stop"
    answer = json.loads(result.choices[0].message.content)
    assert set(answer) == {"answer", "confidence"}
    assert answer["answer"] in ("yes", "no") and 0 <= answer["confidence"] <= 9
