"""Pure: which of vLLM's tool-call and reasoning parsers fit a model, read from its files.

vLLM refuses ``tool_choice`` ``auto``/``required`` unless it is started with
``--enable-auto-tool-choice --tool-call-parser NAME``, and only splits a reasoning model's
thinking from its answer with ``--reasoning-parser NAME``. The right names depend on the
model's family, which its files tell: the architecture in ``config.json`` and the markup its
chat template writes around tool calls and thoughts. The first rule that matches wins; every
choice comes with a sentence saying why. ``APPLIANCE_TOOL_CALL_PARSER`` and
``APPLIANCE_REASONING_PARSER`` override (``none`` turns one off).
"""

from dataclasses import dataclass

AUTO = "auto"
NONE = "none"


@dataclass(frozen=True)
class ModelFamily:
    """What the choice is made from (see ``server.model.read_model_info``)."""

    architectures: tuple[str, ...] = ()
    chat_template: str = ""


@dataclass(frozen=True)
class Rule:
    """``parser`` for models with one of ``architectures``, or whose template holds every
    string of one of the ``markers`` tuples; either way the template must hold ``requires``."""

    parser: str
    family: str
    architectures: tuple[str, ...] = ()
    markers: tuple[tuple[str, ...], ...] = ()
    requires: tuple[str, ...] = ()

    def matches(self, model: ModelFamily) -> str | None:
        """Why it matches, or None."""
        if not all(m in model.chat_template for m in self.requires):
            return None
        for arch in self.architectures:
            if arch in model.architectures:
                return f"architecture {arch}"
        for needed in self.markers:
            if all(m in model.chat_template for m in needed):
                return "chat template writes " + " and ".join(repr(m) for m in needed)
        return None


# DeepSeek's markup uses full-width bars and the "lower one eighth block" as a space.
DEEPSEEK_TOOL_CALLS = "<\uff5ctool\u2581calls\u2581begin\uff5c>"

# Most specific first: several families share Hermes' <tool_call> markup.
TOOL_CALL_RULES: tuple[Rule, ...] = (
    Rule("openai", "gpt-oss (harmony format)", architectures=("GptOssForCausalLM",)),
    Rule("llama4_pythonic", "Llama 4", architectures=("Llama4ForConditionalGeneration",)),
    Rule("mistral", "Mistral", markers=(("[TOOL_CALLS]",),)),
    Rule("deepseek_v31", "DeepSeek V3.1",
         markers=((DEEPSEEK_TOOL_CALLS, "thinking"),)),
    Rule("deepseek_v3", "DeepSeek V3 / R1", markers=((DEEPSEEK_TOOL_CALLS,),)),
    Rule("kimi_k2", "Kimi K2", markers=(("<|tool_calls_section_begin|>",),)),
    Rule("glm45", "GLM-4.5/4.6", architectures=("Glm4MoeForCausalLM",)),
    Rule("minimax_m2", "MiniMax M2", architectures=("MiniMaxM2ForCausalLM",)),
    Rule("hunyuan_a13b", "Hunyuan A13B", architectures=("HunYuanMoEV1ForCausalLM",)),
    Rule("jamba", "Jamba", architectures=("JambaForCausalLM",)),
    Rule("granite4", "Granite 4", architectures=("GraniteMoeHybridForCausalLM",)),
    Rule("granite", "Granite 3", markers=(("<|tool_call|>",),)),
    Rule("internlm", "InternLM 2.5", markers=(("<|action_start|>", "<|plugin|>"),)),
    Rule("phi4_mini_json", "Phi-4-mini", markers=(("functools[",),)),
    Rule("qwen3_coder", "Qwen3-Coder (XML calls)", markers=(("<tool_call>", "<function="),)),
    Rule("llama3_json", "Llama 3.1/3.2/3.3 (JSON calls)",
         markers=(("<|python_tag|>",), ("<|eom_id|>",), ("Environment: ipython",))),
    Rule("hermes", "Hermes-style <tool_call> JSON (Qwen2.5, Qwen3, Hermes, ...)",
         markers=(("<tool_call>", "</tool_call>"),)),
)

REASONING_RULES: tuple[Rule, ...] = (
    Rule("openai_gptoss", "gpt-oss", architectures=("GptOssForCausalLM",)),
    Rule("glm45", "GLM-4.5/4.6", architectures=("Glm4MoeForCausalLM",)),
    Rule("minimax_m2", "MiniMax M2", architectures=("MiniMaxM2ForCausalLM",)),
    Rule("hunyuan_a13b", "Hunyuan A13B", architectures=("HunYuanMoEV1ForCausalLM",)),
    Rule("mistral", "Magistral", markers=(("[THINK]",),)),
    Rule("kimi_k2", "Kimi K2 Thinking", markers=(("<|tool_calls_section_begin|>", "<think>"),)),
    Rule("qwen3", "Qwen3 (thinking)", architectures=("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
         requires=("<think>",)),
    Rule("deepseek_r1", "DeepSeek-R1 style <think> (R1, its distills, QwQ)",
         markers=(("<think>",),)),
)


@dataclass(frozen=True)
class ParserChoice:
    tool_call_parser: str | None
    reasoning_parser: str | None
    reasons: tuple[str, ...]


def pick(rules: tuple[Rule, ...], model: ModelFamily) -> tuple[Rule, str] | None:
    for rule in rules:
        why = rule.matches(model)
        if why is not None:
            return rule, why
    return None


def choose_one(kind: str, setting: str, env: str, rules: tuple[Rule, ...],
               model: ModelFamily) -> tuple[str | None, str]:
    """One parser and the sentence that explains it."""
    if setting.lower() == NONE:
        return None, f"{kind} parser off ({env}=none)"
    if setting.lower() != AUTO:
        return setting, f"{kind} parser {setting}, as configured ({env})"
    found = pick(rules, model)
    if found is None:
        return None, (f"no {kind} parser: the model's files match no family recognised "
                      f"(set {env} to one of vLLM's parser names to turn it on)")
    rule, why = found
    return rule.parser, f"{kind} parser {rule.parser} for {rule.family}: {why}"


def choose_parsers(model: ModelFamily, tool_setting: str = AUTO,
                   reasoning_setting: str = AUTO) -> ParserChoice:
    tool, tool_why = choose_one("tool-call", tool_setting, "APPLIANCE_TOOL_CALL_PARSER",
                                TOOL_CALL_RULES, model)
    reasoning, reasoning_why = choose_one("reasoning", reasoning_setting,
                                          "APPLIANCE_REASONING_PARSER", REASONING_RULES, model)
    return ParserChoice(tool, reasoning, (tool_why, reasoning_why))
