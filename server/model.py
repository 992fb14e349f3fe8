"""What the model is (its ``config.json`` and weight sizes) and where to fetch it from.

A model is named by a local directory, a Hugging Face id or an ``s3://bucket/prefix``.
Remote models are copied into the cache once: downloads resume from partial files, and a
marker written after a complete copy lets later starts skip the network entirely.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from tqdm import tqdm

COMPLETE_MARKER = ".appliance-complete"
CHUNK_BYTES = 8 * 1024 * 1024
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(Exception):
    """The model cannot be found, fetched or understood; the message says which."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["local", "huggingface", "s3"]
    location: str


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int | None
    weight_bytes: int
    architectures: tuple[str, ...] = ()
    chat_template: str = ""
    """Every chat template the model ships, joined: what its tool-call markup looks like."""


def parse_source(spec: str) -> ModelSource:
    """Tell a local directory from a Hugging Face id and an S3 prefix."""
    if not spec:
        raise ModelError("no model configured: set APPLIANCE_MODEL")
    if spec.startswith("s3://"):
        return ModelSource("s3", spec)
    if not Path(spec).exists() and _HF_ID.match(spec) and not spec.startswith("."):
        return ModelSource("huggingface", spec)
    return ModelSource("local", spec)


def cache_dir_for(source: ModelSource, cache: Path) -> Path:
    """A stable directory per remote model, named after it."""
    if source.kind == "s3":
        return cache / "s3" / source.location.removeprefix("s3://").strip("/")
    return cache / "huggingface" / source.location.replace("/", "--")


def existing_dir(source: ModelSource) -> Path:
    """A local model's directory, which must exist: nothing is fetched for it."""
    path = Path(source.location)
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist")
    return path


def local_model_dir(spec: str, cache: Path) -> Path:
    """Where the model already is, fetching nothing: its directory, or its complete copy in
    the cache; a remote model not fetched yet is an error that says so."""
    source = parse_source(spec)
    if source.kind == "local":
        return existing_dir(source)
    dest = cache_dir_for(source, cache)
    if not (dest / COMPLETE_MARKER).is_file():
        raise ModelError(
            f"{spec} is not fetched yet (into {dest}): the plan needs its config.json and "
            "weight sizes; start the engine once, or copy the model there"
        )
    return dest


def fetch_model(spec: str, cache: Path) -> Path:
    """The model's local directory, copying it into ``cache`` first when it is remote."""
    source = parse_source(spec)
    if source.kind == "local":
        return existing_dir(source)
    dest = cache_dir_for(source, cache)
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    if source.kind == "s3":
        _fetch_s3(source.location, dest)
    else:
        _fetch_huggingface(source.location, dest)
    (dest / COMPLETE_MARKER).write_text(spec + "\n")
    return dest


def _fetch_huggingface(repo_id: str, dest: Path) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=repo_id, local_dir=dest)
    except Exception as exc:
        raise ModelError(f"cannot fetch {repo_id} from Hugging Face: {exc}") from exc


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b/``); an empty prefix means the whole bucket."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise ModelError(f"not an S3 URL: {url}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def local_path_for_key(dest: Path, prefix: str, key: str) -> Path:
    """Where an object lands; keys that would escape ``dest`` are refused."""
    relative = PurePosixPath(key.removeprefix(prefix))
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ModelError(f"refusing S3 key outside the model prefix: {key}")
    return dest.joinpath(*relative.parts)


def _fetch_s3(url: str, dest: Path) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_url(url)
    s3 = boto3.client("s3")
    try:
        objects = [
            obj
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        ]
        if not objects:
            raise ModelError(f"no objects under {url}")
        total = sum(obj["Size"] for obj in objects)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetching {url}") as bar:
            for obj in objects:
                target = local_path_for_key(dest, prefix, obj["Key"])
                _fetch_s3_object(s3, bucket, obj["Key"], obj["Size"], target, bar)
    except (BotoCoreError, ClientError) as exc:
        raise ModelError(f"cannot fetch {url}: {exc}") from exc


def _fetch_s3_object(s3, bucket: str, key: str, size: int, target: Path, bar: tqdm) -> None:
    """Download one object, resuming a ``.part`` file left by an interrupted run."""
    if target.is_file() and target.stat().st_size == size:
        bar.update(size)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        have = 0
    bar.update(have)
    if have < size:
        extra = {"Range": f"bytes={have}-"} if have else {}
        body = s3.get_object(Bucket=bucket, Key=key, **extra)["Body"]
        with part.open("ab") as out:
            for chunk in body.iter_chunks(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    part.replace(target)


def read_model_info(path: Path) -> ModelInfo:
    """Heads, context limit and weight size, read from the files vLLM will load."""
    config = read_config(path)
    text = config.get("text_config") or config
    heads = attention_heads(text, path / "config.json")
    return ModelInfo(
        path=path,
        num_attention_heads=heads,
        num_key_value_heads=text.get("num_key_value_heads") or heads,
        max_position_embeddings=context_limit(text),
        weight_bytes=weight_bytes(path),
        architectures=tuple(a for a in config.get("architectures") or () if isinstance(a, str)),
        chat_template=chat_templates(path),
    )


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{config_file} is not a JSON object")
    return config


def attention_heads(text: dict, where: object) -> int:
    heads = text.get("num_attention_heads") or text.get("n_head")
    if not isinstance(heads, int) or heads < 1:
        raise ModelError(f"{where} does not say how many attention heads the model has")
    return heads


def context_limit(text: dict) -> int | None:
    return next(
        (
            text[k]
            for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
            if isinstance(text.get(k), int)
        ),
        None,
    )


def chat_templates(path: Path) -> str:
    """The chat templates in ``tokenizer_config.json`` (a string, or named variants) and in
    the ``chat_template.jinja`` / ``chat_template.json`` files newer models ship instead."""
    found: list[str] = []
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            template = json.loads((path / name).read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(template, str):
            found.append(template)
        elif isinstance(template, list):
            found += [t["template"] for t in template
                      if isinstance(t, dict) and isinstance(t.get("template"), str)]
    for jinja in sorted(path.glob("*.jinja")):
        found.append(jinja.read_text(errors="replace"))
    return "\n".join(found)


def weight_bytes(path: Path) -> int:
    """Bytes of weights: the safetensors files (headers are tiny), else PyTorch ``.bin`` files."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files)


SIXTEEN_BIT = {"float16", "half", "bfloat16"}


@dataclass(frozen=True)
class ModelShape:
    """What placement needs to know of a model: the bytes it holds and what its KV cache costs.

    Multi-head latent attention (DeepSeek's compressed KV) is not modelled: such a model is
    sized as if it kept every KV head, which overstates its cache.
    """

    weight_bytes: int
    """In GPU memory: the checkpoint's files, halved for a float32 checkpoint that vLLM
    downcasts to 16 bits."""
    attention_heads: int
    kv_heads: int
    layers: int
    head_dim: int
    dtype_bytes: int
    """Of the KV cache: the dtype vLLM runs the model in."""
    context: int
    """The longest sequence the model takes (``max_position_embeddings``)."""
    sliding_window: int | None = None
    sliding_layers: int = 0
    """Layers attending to the last ``sliding_window`` tokens only, which cache no more."""

    def kv_bytes(self, sequences: int, tokens: int, tensor_parallel_size: int = 1) -> int:
        """The KV cache one rank holds for ``sequences`` of ``tokens`` each: K and V of its
        share of the KV heads (one at least: vLLM replicates them over more ranks than heads)."""
        heads = max(1, self.kv_heads // tensor_parallel_size)
        per_layer_token = 2 * heads * self.head_dim * self.dtype_bytes
        full = self.layers - self.sliding_layers
        windowed = min(tokens, self.sliding_window or tokens)
        return sequences * per_layer_token * (full * tokens + self.sliding_layers * windowed)


def shape_from_config(config: dict, weight_bytes: int, dtype: str = "auto") -> ModelShape:
    """A model's shape from its ``config.json`` (the text model's, for a multimodal one), the
    size of its weight files and the ``--dtype`` vLLM runs it in.

    vLLM's ``auto`` dtype takes the checkpoint's, except that a float32 checkpoint runs in 16
    bits; that halves its weights in memory too."""
    text = config.get("text_config") or config
    heads = attention_heads(text, "config.json")
    layers = next((text[k] for k in ("num_hidden_layers", "n_layer", "num_layers")
                   if isinstance(text.get(k), int)), None)
    if not layers:
        raise ModelError("config.json does not say how many layers the model has")
    hidden = next((text[k] for k in ("hidden_size", "n_embd", "d_model")
                   if isinstance(text.get(k), int)), None)
    head_dim = text.get("head_dim") or (hidden // heads if hidden else None)
    if not isinstance(head_dim, int):
        raise ModelError("config.json gives neither head_dim nor hidden_size")
    context = context_limit(text)
    if not context:
        raise ModelError("config.json does not say how long a sequence the model takes")
    stored = str(text.get("torch_dtype") or config.get("torch_dtype")
                 or text.get("dtype") or config.get("dtype") or "bfloat16")
    runs_in = stored if dtype == "auto" else dtype
    if runs_in in ("float32", "float") and dtype == "auto":
        runs_in = "bfloat16"
    if stored == "float32" and runs_in in SIXTEEN_BIT:
        weight_bytes //= 2
    window = text.get("sliding_window")
    layer_types = text.get("layer_types") or ()
    sliding = sum(1 for t in layer_types if t == "sliding_attention") if window else 0
    return ModelShape(
        weight_bytes=weight_bytes,
        attention_heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        layers=layers,
        head_dim=head_dim,
        dtype_bytes=4 if runs_in in ("float32", "float") else 2,
        context=context,
        sliding_window=window if sliding else None,
        sliding_layers=sliding,
    )


def read_model_shape(path: Path, dtype: str = "auto") -> ModelShape:
    return shape_from_config(read_config(path), weight_bytes(path), dtype)
