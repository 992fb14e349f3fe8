"""The placement plan over real instance types and real model shapes, with the plans written out.

Run as a script, it rewrites the plans table in docs/engine.md from the same data
(``python -m tests.unit.test_server_placement``); ``test_engine_docs_show_these_plans``
fails while the two differ.
"""

import re
import sys
from pathlib import Path

import pytest

from server.gpus import Gpu
from server.model import ModelShape, shape_from_config
from server.models_file import ModelSpec
from server.placement import PlacementPlan, place_models, render_plan
from server.settings import EngineSettings

GB = 10**9
GIB = 2**30
MIB = 2**20
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "engine.md"

# GPU memory as `nvidia-smi --query-gpu=memory.total` reports it on each instance type (MiB):
# what NVML tells the planner on the host, a little under the marketing figure.
INSTANCES = {
    "g6.xlarge": (1, "NVIDIA L4", 23034),
    "g5.12xlarge": (4, "NVIDIA A10G", 23028),
    "g6e.12xlarge": (4, "NVIDIA L40S", 46068),
    "p4d.24xlarge": (8, "NVIDIA A100-SXM4-40GB", 40960),
    "p5.48xlarge": (8, "NVIDIA H100 80GB HBM3", 81559),
}


def instance(name: str) -> list[Gpu]:
    count, gpu, mib = INSTANCES[name]
    return [Gpu(i, gpu, mib * MIB) for i in range(count)]


# Each model's config.json on Hugging Face (the fields the plan reads, plus hidden size and
# vocabulary for the record), and its weights in memory: bf16, 2 bytes per parameter as the
# model card counts them, except gpt-oss-120b, whose MoE weights ship in MXFP4: 60.8 GiB of
# checkpoint, as OpenAI's model card gives it.
MODELS = {
    # meta-llama/Llama-3.1-8B-Instruct: 8.03B parameters
    "llama-3.1-8b": ({"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                      "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                      "max_position_embeddings": 131072, "torch_dtype": "bfloat16"},
                     int(8.03e9 * 2)),
    # meta-llama/Llama-3.1-70B-Instruct: 70.6B parameters
    "llama-3.1-70b": ({"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                       "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                       "max_position_embeddings": 131072, "torch_dtype": "bfloat16"},
                      int(70.6e9 * 2)),
    # Qwen/Qwen2.5-7B-Instruct: 7.62B parameters (head_dim = 3584 / 28)
    "qwen2.5-7b": ({"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                    "num_key_value_heads": 4, "vocab_size": 152064,
                    "max_position_embeddings": 32768, "torch_dtype": "bfloat16"},
                   int(7.62e9 * 2)),
    # Qwen/Qwen2.5-32B-Instruct: 32.8B parameters (head_dim = 5120 / 40)
    "qwen2.5-32b": ({"hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 40,
                     "num_key_value_heads": 8, "vocab_size": 152064,
                     "max_position_embeddings": 32768, "torch_dtype": "bfloat16"},
                    int(32.8e9 * 2)),
    # Qwen/Qwen2.5-72B-Instruct: 72.7B parameters (head_dim = 8192 / 64)
    "qwen2.5-72b": ({"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                     "num_key_value_heads": 8, "vocab_size": 152064,
                     "max_position_embeddings": 32768, "torch_dtype": "bfloat16"},
                    int(72.7e9 * 2)),
    # mistralai/Mixtral-8x7B-Instruct-v0.1: 46.7B parameters (head_dim = 4096 / 32)
    "mixtral-8x7b": ({"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                      "num_key_value_heads": 8, "vocab_size": 32000,
                      "max_position_embeddings": 32768, "torch_dtype": "bfloat16"},
                     int(46.7e9 * 2)),
    # openai/gpt-oss-120b: 36 layers alternating a 128-token sliding window and full attention
    "gpt-oss-120b": ({"hidden_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
                      "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088,
                      "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
                      "sliding_window": 128,
                      "layer_types": ["sliding_attention", "full_attention"] * 18},
                     int(60.8 * GIB)),
    # BAAI/bge-large-en-v1.5: 335M parameters (BERT: 16 heads, no grouped KV, head_dim 64);
    # its checkpoint is float32, which vLLM runs in 16 bits: 2 bytes a parameter in memory
    "bge-large": ({"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "vocab_size": 30522, "max_position_embeddings": 512,
                   "torch_dtype": "float32"},
                  int(335e6 * 4)),
}
EMBEDDING = {"bge-large"}


def shape(model: str) -> ModelShape:
    config, weights = MODELS[model]
    return shape_from_config(config, weights)


def spec(model: str, replicas: int | str = "auto", **settings) -> ModelSpec:
    base = EngineSettings.model_validate({
        **dict(EngineSettings(_env_file=None)), "model": f"/models/{model}", **settings
    })
    task = "embed" if model in EMBEDDING else "generate"
    return ModelSpec(model, f"/models/{model}", base, replicas, task, frozenset(settings))


def plan(name: str, *models: ModelSpec) -> PlacementPlan:
    return place_models([(m, shape(m.name)) for m in models], instance(name), "gpu")


def layout(result: PlacementPlan) -> list[tuple]:
    """Each model as (name, tensor parallel size, [(GPUs, memory fraction), ...])."""
    return [(m.name, m.tensor_parallel_size, [(r.gpus, r.memory_fraction) for r in m.replicas])
            for m in result.models]


def test_config_numbers_become_kv_bytes_per_token():
    assert shape("llama-3.1-8b").kv_bytes(1, 1) == 32 * 2 * 8 * 128 * 2  # 128 KiB a token
    assert shape("llama-3.1-70b").kv_bytes(1, 1, 4) == 80 * 2 * 2 * 128 * 2
    assert shape("qwen2.5-7b").head_dim == 128
    assert shape("bge-large").kv_heads == 16
    assert shape("bge-large").weight_bytes == 670 * 10**6  # float32 on disk, 16 bits in memory
    oss = shape("gpt-oss-120b")
    assert (oss.sliding_layers, oss.sliding_window) == (18, 128)
    # 131072 tokens: the 18 full-attention layers hold all of them, the others 128 each
    assert oss.kv_bytes(1, 131072) == 2 * 8 * 64 * 2 * (18 * 131072 + 18 * 128)


# Every model alone on every instance type, replicas "auto": (tensor parallel size, replicas),
# or the start of the refusal.
ALONE = {
    "g6.xlarge": {
        "llama-3.1-8b": "no room for a KV cache worth serving",
        "llama-3.1-70b": "its weights (131.5 GiB) do not fit",
        "qwen2.5-7b": (1, 1),
        "qwen2.5-32b": "its weights (61.1 GiB) do not fit",
        "qwen2.5-72b": "its weights (135.4 GiB) do not fit",
        "mixtral-8x7b": "its weights (87.0 GiB) do not fit",
        "gpt-oss-120b": "its weights (60.8 GiB) do not fit",
        "bge-large": (1, 1),
    },
    "g5.12xlarge": {
        "llama-3.1-8b": (2, 2),
        "llama-3.1-70b": "its weights (131.5 GiB) do not fit",
        "qwen2.5-7b": (1, 4),
        "qwen2.5-32b": (4, 1),
        "qwen2.5-72b": "its weights (135.4 GiB) do not fit",
        "mixtral-8x7b": "its weights (87.0 GiB) do not fit",
        "gpt-oss-120b": (4, 1),
        "bge-large": (1, 4),
    },
    "g6e.12xlarge": {
        "llama-3.1-8b": (1, 4),
        "llama-3.1-70b": "no room for a KV cache worth serving",
        "qwen2.5-7b": (1, 4),
        "qwen2.5-32b": (2, 2),
        "qwen2.5-72b": (4, 1),
        "mixtral-8x7b": (4, 1),
        "gpt-oss-120b": (2, 2),
        "bge-large": (1, 4),
    },
    "p4d.24xlarge": {
        "llama-3.1-8b": (1, 8),
        "llama-3.1-70b": (8, 1),
        "qwen2.5-7b": (1, 8),
        "qwen2.5-32b": (4, 2),
        "qwen2.5-72b": (8, 1),
        "mixtral-8x7b": (4, 2),
        "gpt-oss-120b": (2, 4),
        "bge-large": (1, 8),
    },
    "p5.48xlarge": {
        "llama-3.1-8b": (1, 8),
        "llama-3.1-70b": (4, 2),
        "qwen2.5-7b": (1, 8),
        "qwen2.5-32b": (1, 8),
        "qwen2.5-72b": (4, 2),
        "mixtral-8x7b": (2, 4),
        "gpt-oss-120b": (1, 8),
        "bge-large": (1, 8),
    },
}


@pytest.mark.parametrize(
    ("name", "model", "expected"),
    [(name, model, expected) for name, row in ALONE.items() for model, expected in row.items()],
)
def test_each_model_alone_with_auto_replicas(name, model, expected):
    result = plan(name, spec(model))
    if isinstance(expected, str):
        assert not result.ok
        assert result.errors[-1].startswith(f"{model}: {expected}"), result.errors
        return
    assert result.ok, result.errors
    tp, replicas = expected
    (placed,) = result.models
    assert (placed.tensor_parallel_size, len(placed.replicas)) == (tp, replicas)
    gpus = [index for r in placed.replicas for index in r.gpus]
    assert gpus == list(range(tp * replicas)), "replicas take GPUs in order, none twice"
    assert [r.port for r in placed.replicas] == list(range(8000, 8000 + replicas))
    assert {r.memory_fraction for r in placed.replicas} == {0.9}


def test_an_8b_on_eight_h100s_is_eight_replicas_of_one_gpu():
    assert layout(plan("p5.48xlarge", spec("llama-3.1-8b"))) == [
        ("llama-3.1-8b", 1, [((i,), 0.9) for i in range(8)])
    ]


def test_a_70b_on_eight_a100s_needs_all_eight_for_its_kv_cache():
    result = plan("p4d.24xlarge", spec("llama-3.1-70b"))
    assert layout(result) == [("llama-3.1-70b", 8, [(tuple(range(8)), 0.9)])]
    assert any("at 4, 44.9 GiB would not fit" in r for r in result.reasons), result.reasons


def test_a_70b_on_one_l4_is_refused_with_the_numbers():
    result = plan("g6.xlarge", spec("llama-3.1-70b"))
    assert result.errors == (
        "llama-3.1-70b: its weights (131.5 GiB) do not fit: at tensor parallel size 1, the "
        "most that 1 GPU(s) and its 64 attention heads and 8 KV heads allow, each GPU would "
        "hold 131.5 GiB of weights and 2.0 GiB for vLLM, more than the 20.2 GiB allowed (90% "
        "of 22.5 GiB); use a quantized model or more GPUs",
    )
    assert result.models == ()


def test_an_8b_on_one_l4_fits_with_a_shorter_context():
    refused = plan("g6.xlarge", spec("llama-3.1-8b"))
    assert "a max_model_len of at most 26624 fits" in refused.errors[-1]
    assert layout(plan("g6.xlarge", spec("llama-3.1-8b", max_model_len=16384))) == [
        ("llama-3.1-8b", 1, [((0,), 0.9)])
    ]


def test_a_70b_on_four_l40s_fits_at_the_context_its_refusal_names():
    refused = plan("g6e.12xlarge", spec("llama-3.1-70b"))
    assert "a max_model_len of at most 72704 fits" in refused.errors[-1]
    assert layout(plan("g6e.12xlarge", spec("llama-3.1-70b", max_model_len=72704))) == [
        ("llama-3.1-70b", 4, [((0, 1, 2, 3), 0.9)])
    ]


def test_a_chat_model_and_an_embedding_model_share_a_box():
    result = plan("g6e.12xlarge", spec("llama-3.1-8b"), spec("bge-large", 1))
    assert layout(result) == [
        ("llama-3.1-8b", 1, [((0,), 0.83), ((1,), 0.9), ((2,), 0.9), ((3,), 0.9)]),
        ("bge-large", 1, [((0,), 0.07)]),
    ]
    bge = result.models[1].replicas[0]
    assert (bge.port, bge.shares) == (8004, True)
    assert any("bge-large: replica 0 shares GPU(s) 0 with llama-3.1-8b" in r
               for r in result.reasons)


def test_a_70b_and_an_embedding_model_on_eight_h100s():
    assert layout(plan("p5.48xlarge", spec("llama-3.1-70b"), spec("bge-large"))) == [
        ("llama-3.1-70b", 4, [((0, 1, 2, 3), 0.86), ((4, 5, 6, 7), 0.9)]),
        ("bge-large", 1, [((0,), 0.04)]),
    ]


def test_an_embedding_model_and_a_7b_do_not_both_fit_one_l4():
    result = plan("g6.xlarge", spec("qwen2.5-7b"), spec("bge-large"))
    assert result.errors[-1].startswith("bge-large: no room for replica 1 of 1 (1 GPU(s) with "
                                        "3.0 GiB each): every GPU is taken")


def test_two_auto_models_take_turns_at_the_free_gpus():
    # one each, then one more each in turn: 7B, Mixtral, 7B, (Mixtral finds 1 GPU), 7B
    result = plan("p5.48xlarge", spec("qwen2.5-7b"), spec("mixtral-8x7b"))
    assert layout(result) == [
        ("qwen2.5-7b", 1, [((0,), 0.9), ((1,), 0.9), ((2,), 0.9), ((3,), 0.9)]),
        ("mixtral-8x7b", 2, [((4, 5), 0.9), ((6, 7), 0.9)]),
    ]


def test_gpus_no_model_asks_for_stay_idle_and_the_plan_says_so():
    result = plan("p5.48xlarge", spec("llama-3.1-70b", 1, tensor_parallel_size=4))
    assert layout(result) == [("llama-3.1-70b", 4, [((0, 1, 2, 3), 0.9)])]
    assert result.reasons[-1] == ("GPU(s) 4, 5, 6, 7 left idle: no model asks for more "
                                  'replicas (replicas = "auto" would use them)')


def test_a_set_number_of_replicas_grows_into_idle_gpus():
    result = plan("p4d.24xlarge", spec("qwen2.5-32b", 1), spec("qwen2.5-7b", 2))
    assert layout(result) == [
        ("qwen2.5-32b", 4, [((0, 1, 2, 3), 0.9)]),
        ("qwen2.5-7b", 2, [((4, 5), 0.9), ((6, 7), 0.9)]),
    ]


def test_growth_stops_where_the_heads_no_longer_divide():
    # 28 heads and 4 KV heads: 4 GPUs at most, as server/plan.py's single engine
    assert layout(plan("p5.48xlarge", spec("qwen2.5-7b", 1))) == [
        ("qwen2.5-7b", 4, [((0, 1, 2, 3), 0.9)])
    ]


def test_a_set_number_of_replicas_is_exactly_that_or_refused():
    result = plan("p5.48xlarge", spec("llama-3.1-70b", 3))
    assert not result.ok
    assert result.errors[-1].startswith("llama-3.1-70b: no room for replica 3 of 3")


def test_gpt_oss_fits_one_h100_thanks_to_its_sliding_window():
    result = plan("p5.48xlarge", spec("gpt-oss-120b", 1, tensor_parallel_size=1))
    assert layout(result) == [("gpt-oss-120b", 1, [((0,), 0.9)])]
    assert "a 4.5 GiB KV cache (one 131072-token sequence)" in result.reasons[1]


def test_a_configured_size_that_cannot_split_the_heads_is_refused():
    result = plan("p5.48xlarge", spec("qwen2.5-7b", 1, tensor_parallel_size=8))
    assert result.errors[-1] == ("qwen2.5-7b: tensor parallel size 8 cannot split its 28 "
                                 "attention heads and 4 KV heads evenly")


def test_a_model_set_memory_fraction_is_kept_by_a_guest():
    result = plan("p5.48xlarge", spec("llama-3.1-8b"),
                  spec("bge-large", 1, gpu_memory_utilization=0.1))
    assert layout(result)[1] == ("bge-large", 1, [((0,), 0.1)])
    assert layout(result)[0][2][0] == ((0,), 0.8)


def test_the_fractions_on_every_gpu_stay_within_the_owners():
    result = plan("p5.48xlarge", spec("llama-3.1-70b"), spec("bge-large", 2),
                  spec("qwen2.5-7b", 1))
    per_gpu: dict[int, float] = {}
    for _, replica in result.replicas:
        for index in replica.gpus:
            per_gpu[index] = per_gpu.get(index, 0) + replica.memory_fraction
    assert all(total <= 0.9 + 1e-9 for total in per_gpu.values()), per_gpu
    ports = [replica.port for _, replica in result.replicas]
    assert ports == list(range(8000, 8000 + len(ports)))


def test_cpu_runs_one_replica_per_model():
    result = place_models([(spec("qwen2.5-7b"), shape("qwen2.5-7b")),
                           (spec("bge-large", 2), shape("bge-large"))],
                          [], "cpu", available_memory=64 * GIB)
    assert result.ok, result.errors
    assert [(m.name, len(m.replicas), m.replicas[0].port, m.replicas[0].gpus)
            for m in result.models] == [("qwen2.5-7b", 1, 8000, ()), ("bge-large", 1, 8001, ())]
    assert all(r.kv_cache_memory_bytes for _, r in result.replicas)


# docs/engine.md's table of plans, written from ALONE and COMBINATIONS by this module.
COMBINATIONS = [
    ("g6e.12xlarge", [spec("llama-3.1-8b"), spec("bge-large", 1)]),
    ("p5.48xlarge", [spec("llama-3.1-70b"), spec("bge-large", 1)]),
    ("p4d.24xlarge", [spec("qwen2.5-32b", 1), spec("qwen2.5-7b", 2)]),
]
BEGIN, END = "<!-- placement:examples begin -->", "<!-- placement:examples end -->"


def cell(result: PlacementPlan) -> str:
    if not result.ok:
        return "no: KV cache" if "KV cache worth serving" in result.errors[-1] else "no: weights"
    (placed,) = result.models
    return f"TP {placed.tensor_parallel_size} x {len(placed.replicas)}"


def examples() -> str:
    names = list(MODELS)
    lines = [
        "Generated by `python -m tests.unit.test_server_placement` from the table in that "
        "test: each model alone, `replicas = \"auto\"`, its own context length "
        "(TP: tensor-parallel size x replicas; *no*: refused, for want of room for the "
        "weights or for a KV cache worth serving).",
        "",
        "| instance | GPUs | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for name, (count, gpu, mib) in INSTANCES.items():
        cells = [cell(plan(name, spec(model))) for model in names]
        lines.append(f"| {name} | {count}x {gpu} ({mib} MiB) | " + " | ".join(cells) + " |")
    for name, models in COMBINATIONS:
        listed = " + ".join(f"{m.name} (replicas {m.replicas})" for m in models)
        text = render_plan(plan(name, *models)).split("\nwhy:")[0]
        lines += ["", f"{name}, {listed}:", "", "```", text, "```"]
    return "\n".join(lines)


def test_engine_docs_show_these_plans():
    text = DOC.read_text()
    region = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    assert region == examples(), "run: python -m tests.unit.test_server_placement"


if __name__ == "__main__":
    text = DOC.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    DOC.write_text(pattern.sub(lambda _: f"{BEGIN}\n{examples()}\n{END}", text))
    print(f"rewrote {DOC.relative_to(ROOT)}", file=sys.stderr)
