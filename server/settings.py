"""Every knob of the engine launcher, read from ``APPLIANCE_*`` environment variables.

Production reads them from ``/etc/appliance/appliance.env`` (the file systemd's
``EnvironmentFile`` loads too); the process environment wins over the file. The launcher
also writes the generated internal key into that file, so ``APPLIANCE_ENV_FILE`` may point
a development stack at a file of its own.
"""

import os
import shlex
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_FILE = Path("/etc/appliance/appliance.env")
MODELS_FILE = Path("/etc/appliance/models.toml")
ADAPTERS_FILE = Path("/var/lib/appliance/adapters.json")


def env_file_path() -> Path:
    """The env file this host uses; read before the settings, since it is where they live."""
    return Path(os.environ.get("APPLIANCE_ENV_FILE") or ENV_FILE)


def readable_env_file(path: Path) -> Path | None:
    """The env file when this user may read it; root-only files are loaded by systemd instead."""
    return path if os.access(path, os.R_OK) else None


Fraction = Annotated[float, Field(gt=0, le=1)]


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_", extra="ignore", protected_namespaces=()
    )

    model: str = ""
    """A local directory, a Hugging Face model id (``org/name``) or an ``s3://bucket/prefix``."""
    served_model_name: str = ""
    """The name clients put in ``"model"``; the Hugging Face id or directory name when empty."""
    model_cache: Path = Path("/var/lib/appliance/models")
    """Where fetched models are stored; a complete fetch is never repeated."""
    models_file: Path = MODELS_FILE
    """More than one model on the host: one ``[[models]]`` table each (TOML; see
    ``server/models.example.toml``); when the file is absent, ``model`` is the one model."""
    adapters_file: Path = ADAPTERS_FILE
    """The LoRA adapters added by ``appliance-models add-adapter``: loaded again at every start."""
    enable_lora: bool = False
    """Start vLLM with LoRA (memory reserved for adapters) even when the model has none yet, so
    ``appliance-models add-adapter`` can load one at runtime; on anyway when it has adapters."""

    device: Literal["auto", "gpu", "cpu"] = "auto"
    """``auto`` uses the GPUs when there are any, else vLLM's CPU build when installed."""
    tensor_parallel_size: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    """GPUs the model is split over; ``auto`` takes the most the host and the model allow."""
    pipeline_parallel_size: Annotated[int, Field(ge=1)] = 1
    """Nodes one model is split over (vLLM pipeline parallel over Ray), one stage per node;
    above 1, one node is ``APPLIANCE_NODE_ROLE=head`` and the others ``worker``."""
    node_role: Literal["single", "head", "worker"] = "single"
    """``head`` serves the API and runs vLLM over the Ray cluster; a ``worker`` joins the head's
    cluster and lends its GPUs (it serves nothing itself)."""
    head_address: str = ""
    """The head node's private address, which workers join (required on a worker)."""
    ray_port: Annotated[int, Field(ge=1, le=65535)] = 6380
    """The Ray cluster's port on the head (not Ray's default 6379, which Redis uses)."""
    max_model_len: Annotated[int, Field(ge=1)] | None = None
    """Context length (prompt plus output); the model's own limit when unset."""
    gpu_memory_utilization: Fraction = 0.90
    """Fraction of each GPU's memory vLLM may take for weights, activations and KV cache."""
    kv_cache_memory_bytes: Annotated[int, Field(ge=1)] | None = None
    """A fixed KV cache size instead of the memory fraction (on CPU this bounds RAM use)."""
    max_num_seqs: Annotated[int, Field(ge=1)] = 256
    """Sequences batched at once: throughput against per-request latency."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (system prompts, chat history)."""
    enforce_eager: bool | None = None
    """Skip CUDA graphs and compilation: slower decoding, faster start; unset means on CPU only."""
    quantization: str | None = None
    """vLLM's ``--quantization`` (``awq``, ``fp8``, ...); read from the model when unset."""
    dtype: str = "auto"

    tool_call_parser: str = "auto"
    """vLLM's ``--tool-call-parser`` (with ``--enable-auto-tool-choice``); ``auto`` picks one
    from the model's files, ``none`` turns tool calling off."""
    reasoning_parser: str = "auto"
    """vLLM's ``--reasoning-parser``; ``auto`` picks one for reasoning models, ``none``: off."""

    engine_host: str = "127.0.0.1"
    """vLLM binds here; keep it on loopback so only the proxy reaches it."""
    engine_port: Annotated[int, Field(ge=1, le=65535)] = 8000
    engine_api_key: str = ""
    """The internal key vLLM requires (the proxy sends it); generated on first start if empty."""
    engine_extra_args: str = ""
    """More vLLM arguments, shell-quoted, for anything not modelled here; they come last and win."""

    shutdown_grace_s: Annotated[float, Field(ge=0)] = 30.0
    """On SIGTERM, how long in-flight requests may run before vLLM is stopped."""

    @field_validator(
        "quantization", "max_model_len", "kv_cache_memory_bytes", "enforce_eager", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``APPLIANCE_MAX_MODEL_LEN=`` in the env file means "not set", not an error."""
        return None if value == "" else value

    @field_validator("tool_call_parser", "reasoning_parser")
    @classmethod
    def _parser_name(cls, value: str) -> str:
        """A parser name is one token: it lands on vLLM's command line."""
        value = value.strip() or "auto"
        if not all(c.isalnum() or c in "_-." for c in value):
            raise ValueError(f"{value!r} is not a parser name")
        return value

    @field_validator("engine_extra_args")
    @classmethod
    def _extra_args_parse(cls, value: str) -> str:
        shlex.split(value)
        return value

    @property
    def extra_args(self) -> list[str]:
        return shlex.split(self.engine_extra_args)


def load_settings(env_file: Path | None = None) -> EngineSettings:
    return EngineSettings(_env_file=readable_env_file(env_file or env_file_path()))
