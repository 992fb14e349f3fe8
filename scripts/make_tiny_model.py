#!/usr/bin/env python3
"""Write a tiny random-weight Llama-style model that vLLM and transformers can load.

Tests and ``make run`` need a real model on a machine with no hub access and no GPU: this
one is a few MB, has a byte-level BPE tokenizer trained here on a built-in text, a chat
template, and weights drawn from a seeded generator, so the same seed gives the same files.
Its shape is chosen for vLLM's CPU kernels (head size 64) and for tensor parallelism over
two devices (4 attention heads, 2 KV heads).

Run it with the engine's environment (it needs numpy, safetensors and tokenizers):
``.venv-engine/bin/python scripts/make_tiny_model.py DIR [--seed N]``.

``--lora DIR`` writes a LoRA adapter for that model instead, in PEFT's format (written by hand:
the engine's environment has no ``peft``): rank 8 over the attention's ``q_proj`` and
``v_proj``, random A and B (B not zero, so the adapter changes what the model says).
"""

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [PAD, BOS, EOS, *(f"<|{role}|>" for role in ROLES)]

# Hermes-style tool calling (as Qwen2.5 and Qwen3 write it): the tools are listed in the
# system turn, calls are JSON inside <tool_call></tool_call>, results come back in
# <tool_response>. appliance-engine recognises the markup and turns on vLLM's hermes parser.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|system|>\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n' }}{% endif %}"
    "{{ 'You may call functions. Their signatures:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\nTo call one, write <tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>' }}"
    "{{ eos_token + '\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools %}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|assistant|>\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{% set arguments = call['function']['arguments'] %}"
    "{{ '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{ (arguments if arguments is string else arguments | tojson) + '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ eos_token + '\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|user|>\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{{ eos_token + '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') + eos_token + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}

CORPUS = """\
The appliance answers questions over HTTPS. A client sends a prompt and receives tokens as
they are generated. The gateway checks the key, counts the tokens and forwards the request to
the engine, which runs the model on the graphics cards. When a card has too little memory,
the model is split over several cards, and each card holds a part of every layer.
Hello! How are you today? I am fine, thank you. What is the weather like? It is sunny and
warm, with a light wind from the west. Tell me a story about a small robot who learned to
paint. Once upon a time, in a quiet town by the sea, there lived a robot named Pixel.
Every morning Pixel walked to the harbour, watched the boats and the birds, and tried to
remember their colours: blue, green, yellow, red, white and grey. One day a painter gave
Pixel a brush. The first picture was a mess, the second was better, and the hundredth was
beautiful. Numbers: one, two, three, four, five, six, seven, eight, nine, ten, 0 1 2 3 4 5 6
7 8 9 10 100 1000. Code: def add(a, b): return a + b. for i in range(10): print(i).
Questions and answers, requests and responses, streams and chunks, keys and limits, errors
and retries: a server must handle them all, quickly and correctly, for many users at once.
"""


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def random_weights(vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Llama tensors under transformers' names, drawn in a fixed order from one generator."""
    rng = np.random.default_rng(seed)
    hidden, inter = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    head_dim = hidden // SHAPE["num_attention_heads"]
    kv_dim = SHAPE["num_key_value_heads"] * head_dim

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0)}
    for i in range(SHAPE["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        weights |= {
            f"{layer}.input_layernorm.weight": np.ones(hidden, np.float32),
            f"{layer}.self_attn.q_proj.weight": normal(hidden, hidden),
            f"{layer}.self_attn.k_proj.weight": normal(kv_dim, hidden),
            f"{layer}.self_attn.v_proj.weight": normal(kv_dim, hidden),
            f"{layer}.self_attn.o_proj.weight": normal(hidden, hidden),
            f"{layer}.post_attention_layernorm.weight": np.ones(hidden, np.float32),
            f"{layer}.mlp.gate_proj.weight": normal(inter, hidden),
            f"{layer}.mlp.up_proj.weight": normal(inter, hidden),
            f"{layer}.mlp.down_proj.weight": normal(hidden, inter),
        }
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    # A wide output layer makes greedy choices clear-cut, so they do not flip with the
    # summation order of a tensor-parallel all-reduce.
    weights["lm_head.weight"] = normal(vocab, hidden, std=0.5)
    return weights


def write_model(out: Path, seed: int = 0, vocab_size: int = 1024) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    vocab = tokenizer.get_vocab_size()
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {name: tokenizer.token_to_id(name) for name in (BOS, EOS, PAD)}

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **SHAPE,
        "head_dim": SHAPE["hidden_size"] // SHAPE["num_attention_heads"],
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": SHAPE["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
    }
    for name, content in (
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
        ("special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}),
    ):
        (out / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    save_file(
        random_weights(vocab, seed), str(out / "model.safetensors"), metadata={"format": "pt"}
    )


LORA_TARGETS = ("q_proj", "v_proj")
LORA_RANK = 8


def write_lora(out: Path, base: str = "tiny", seed: int = 1, rank: int = LORA_RANK) -> None:
    """A PEFT LoRA adapter for the tiny model: ``adapter_config.json`` and
    ``adapter_model.safetensors`` with ``lora_A`` (rank x in) and ``lora_B`` (out x rank)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hidden = SHAPE["hidden_size"]
    kv_dim = SHAPE["num_key_value_heads"] * hidden // SHAPE["num_attention_heads"]
    out_dims = {"q_proj": hidden, "k_proj": kv_dim, "v_proj": kv_dim, "o_proj": hidden}
    tensors = {}
    for i in range(SHAPE["num_hidden_layers"]):
        for target in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = (
                rng.standard_normal((rank, hidden)) * 0.05).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (
                rng.standard_normal((out_dims[target], rank)) * 0.05).astype(np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="weights' random seed")
    parser.add_argument("--lora", action="store_true",
                        help="write a LoRA adapter for the tiny model into DIR instead")
    args = parser.parse_args()
    if args.lora:
        write_lora(args.dir, seed=args.seed)
    else:
        write_model(args.dir, seed=args.seed)
    print(args.dir)


if __name__ == "__main__":
    main()
