"""server/parsers.py: the model family -> vLLM's tool-call and reasoning parsers, and why."""

import json
from pathlib import Path

import pytest

from server.model import chat_templates
from server.parsers import REASONING_RULES, TOOL_CALL_RULES, ModelFamily, choose_parsers

# Fragments of the real chat templates each family ships (enough to tell them apart).
QWEN25 = "<|im_start|>system\n{{ tools }}<tool_call>\n{\"name\": ...}\n</tool_call><|im_end|>"
QWEN3 = QWEN25 + "{%- if enable_thinking is false %}<think>\n\n</think>{% endif %}"
QWEN3_CODER = "<tool_call>\n<function=example_function_name>\n<parameter=x>\n</tool_call>"
LLAMA31 = "Environment: ipython\n<|python_tag|>{{ tool_call | tojson }}<|eom_id|>"
MISTRAL = "[AVAILABLE_TOOLS] {{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS] {{ calls }}"
MAGISTRAL = MISTRAL + "[THINK]...[/THINK]"
DEEPSEEK_V3 = ("<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>"
               "function<\uff5ctool\u2581sep\uff5c>")
DEEPSEEK_V31 = DEEPSEEK_V3 + "{% if thinking %}<think>{% endif %}"
R1_DISTILL = "<\uff5cAssistant\uff5c><think>\n"
GRANITE3 = "<|start_of_role|>available_tools<|end_of_role|><|tool_call|>"
PLAIN = "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.mark.parametrize(
    ("architecture", "template", "tool", "reasoning"),
    [
        ("Qwen2ForCausalLM", QWEN25, "hermes", None),
        ("Qwen3ForCausalLM", QWEN3, "hermes", "qwen3"),
        ("Qwen3MoeForCausalLM", QWEN3, "hermes", "qwen3"),
        ("Qwen3MoeForCausalLM", QWEN3_CODER, "qwen3_coder", None),
        ("Qwen2ForCausalLM", QWEN25 + "<think>\n", "hermes", "deepseek_r1"),  # QwQ
        ("LlamaForCausalLM", LLAMA31, "llama3_json", None),
        ("Llama4ForConditionalGeneration", "<|header_start|>", "llama4_pythonic", None),
        ("MistralForCausalLM", MISTRAL, "mistral", None),
        ("MistralForCausalLM", MAGISTRAL, "mistral", "mistral"),
        ("DeepseekV3ForCausalLM", DEEPSEEK_V3 + "<think>", "deepseek_v3", "deepseek_r1"),
        ("DeepseekV3ForCausalLM", DEEPSEEK_V31, "deepseek_v31", "deepseek_r1"),
        ("Qwen2ForCausalLM", R1_DISTILL, None, "deepseek_r1"),
        ("GptOssForCausalLM", "<|channel|>", "openai", "openai_gptoss"),
        ("Glm4MoeForCausalLM", "<tool_call>{{ name }}<arg_key>", "glm45", "glm45"),
        ("GraniteForCausalLM", GRANITE3, "granite", None),
        ("GraniteMoeHybridForCausalLM", "<tool_call>", "granite4", None),
        ("LlamaForCausalLM", PLAIN, None, None),  # Llama 2, TinyLlama: no tools
        ("GPT2LMHeadModel", "", None, None),  # no template at all
    ],
)
def test_family_picks_parsers(architecture, template, tool, reasoning):
    choice = choose_parsers(ModelFamily((architecture,), template))
    assert (choice.tool_call_parser, choice.reasoning_parser) == (tool, reasoning)
    assert len(choice.reasons) == 2


def test_every_choice_says_why():
    choice = choose_parsers(ModelFamily(("Qwen3ForCausalLM",), QWEN3))
    assert "hermes" in choice.reasons[0] and "'<tool_call>'" in choice.reasons[0]
    assert "qwen3" in choice.reasons[1] and "Qwen3ForCausalLM" in choice.reasons[1]
    none = choose_parsers(ModelFamily(("LlamaForCausalLM",), PLAIN))
    assert "APPLIANCE_TOOL_CALL_PARSER" in none.reasons[0]


def test_settings_override_and_none_turns_off():
    model = ModelFamily(("Qwen3ForCausalLM",), QWEN3)
    forced = choose_parsers(model, "llama3_json", "deepseek_r1")
    assert (forced.tool_call_parser, forced.reasoning_parser) == ("llama3_json", "deepseek_r1")
    assert "as configured" in forced.reasons[0]
    off = choose_parsers(model, "none", "NONE")
    assert (off.tool_call_parser, off.reasoning_parser) == (None, None)


def test_parser_names_are_vllms_own():
    """Names vLLM registers (its tool_parsers/ and reasoning/ registries, v0.32)."""
    vllm_tools = {"openai", "llama4_pythonic", "mistral", "deepseek_v31", "deepseek_v3",
                  "kimi_k2", "glm45", "minimax_m2", "hunyuan_a13b", "jamba", "granite4",
                  "granite", "internlm", "phi4_mini_json", "qwen3_coder", "llama3_json", "hermes"}
    vllm_reasoning = {"openai_gptoss", "glm45", "minimax_m2", "hunyuan_a13b", "mistral",
                      "kimi_k2", "qwen3", "deepseek_r1"}
    assert {r.parser for r in TOOL_CALL_RULES} <= vllm_tools
    assert {r.parser for r in REASONING_RULES} <= vllm_reasoning


def test_templates_are_read_from_every_file_a_model_may_ship(tmp_path: Path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "A"},
                           {"name": "tool_use", "template": "<tool_call>B"}]}))
    (tmp_path / "chat_template.jinja").write_text("C [TOOL_CALLS]")
    text = chat_templates(tmp_path)
    assert "A" in text and "<tool_call>B" in text and "[TOOL_CALLS]" in text
    assert chat_templates(tmp_path / "missing") == ""
