"""Model inspection and fetching: a real local directory, and S3 against a local moto server."""

import json
import time
from pathlib import Path

import boto3
import pytest

from server.model import (
    COMPLETE_MARKER,
    ModelError,
    ModelSource,
    cache_dir_for,
    fetch_model,
    local_model_dir,
    local_path_for_key,
    parse_source,
    read_model_info,
    shape_from_config,
    split_s3_url,
)
from tests.servers import VENV_BIN, free_port, running

BUCKET = "models"
PREFIX = "team/tiny"
WEIGHTS = bytes(range(256)) * 4096  # 1 MiB, distinct bytes so a wrong offset shows
OBJECTS = {
    "config.json": json.dumps(
        {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}
    ).encode(),
    "model.safetensors": WEIGHTS,
    "tokenizer/tokenizer.json": b"{}",
}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with running(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        ready_url=f"{url}/moto-api/",
        log=log,
    ):
        yield url


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for key, body in OBJECTS.items():
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=body)
    client.put_object(Bucket=BUCKET, Key="team/tiny-other/config.json", Body=b"{}")
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def url() -> str:
    return f"s3://{BUCKET}/{PREFIX}"


def test_s3_prefix_is_fetched_into_the_cache(s3, tmp_path):
    path = fetch_model(url(), tmp_path)
    assert path == tmp_path / "s3" / BUCKET / PREFIX
    for key, body in OBJECTS.items():
        assert (path / key).read_bytes() == body
    assert not (path / "config.json.part").exists()
    assert not (path.parent / "tiny-other").exists()  # a sibling prefix is not pulled in
    assert (path / COMPLETE_MARKER).is_file()
    info = read_model_info(path)
    assert (info.num_attention_heads, info.num_key_value_heads) == (4, 2)


def test_complete_fetch_is_skipped_without_touching_s3(s3, tmp_path, monkeypatch):
    fetch_model(url(), tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing there
    started = time.monotonic()
    assert fetch_model(url(), tmp_path) == tmp_path / "s3" / BUCKET / PREFIX
    assert time.monotonic() - started < 1


def test_interrupted_download_resumes_from_the_partial_file(s3, tmp_path):
    dest = tmp_path / "s3" / BUCKET / PREFIX
    dest.mkdir(parents=True)
    half = len(WEIGHTS) // 2
    # Marked bytes stand in for what the interrupted run wrote: a resumed download keeps them.
    (dest / "model.safetensors.part").write_bytes(b"\xff" * half)
    fetch_model(url(), tmp_path)
    weights = (dest / "model.safetensors").read_bytes()
    assert weights == b"\xff" * half + WEIGHTS[half:]


def test_incomplete_fetch_downloads_only_what_is_missing(s3, tmp_path):
    dest = tmp_path / "s3" / BUCKET / PREFIX
    (dest / "tokenizer").mkdir(parents=True)
    (dest / "tokenizer" / "tokenizer.json").write_bytes(b"{}")
    s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/tokenizer/tokenizer.json")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/tokenizer/tokenizer.json", Body=b"[]")
    fetch_model(url(), tmp_path)
    assert (dest / "tokenizer" / "tokenizer.json").read_bytes() == b"{}"  # complete, kept
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS


def test_empty_prefix_is_an_error_and_leaves_no_marker(s3, tmp_path):
    with pytest.raises(ModelError, match="no objects under"):
        fetch_model(f"s3://{BUCKET}/nothing-here", tmp_path)
    assert not (tmp_path / "s3" / BUCKET / "nothing-here" / COMPLETE_MARKER).exists()


def test_missing_bucket_is_a_model_error(s3, tmp_path):
    with pytest.raises(ModelError, match="cannot fetch"):
        fetch_model("s3://no-such-bucket/m", tmp_path)


def test_unreachable_hub_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ModelError, match="cannot fetch org/model from Hugging Face"):
        fetch_model("org/model", tmp_path)
    assert not (tmp_path / "huggingface" / "org--model" / COMPLETE_MARKER).exists()


def test_local_directory_is_used_in_place(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8}))
    assert fetch_model(str(tmp_path), tmp_path / "cache") == tmp_path
    assert not (tmp_path / "cache").exists()


def test_missing_local_directory_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        fetch_model(str(tmp_path / "absent"), tmp_path)


def test_no_model_configured_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="APPLIANCE_MODEL"):
        fetch_model("", tmp_path)


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("s3://bucket/prefix", "s3"),
        ("meta-llama/Llama-3.1-8B-Instruct", "huggingface"),
        ("/srv/models/llama", "local"),
        ("./models/llama", "local"),
        ("llama", "local"),
    ],
)
def test_parse_source(spec, kind):
    assert parse_source(spec) == ModelSource(kind, spec)


def test_an_existing_directory_wins_over_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_source("org/name").kind == "local"


def test_split_s3_url():
    assert split_s3_url("s3://b/a/c/") == ("b", "a/c/")
    assert split_s3_url("s3://b") == ("b", "")
    with pytest.raises(ModelError):
        split_s3_url("s3:///x")


def test_keys_cannot_escape_the_cache(tmp_path):
    assert local_path_for_key(tmp_path, "p/", "p/a/b.json") == tmp_path / "a" / "b.json"
    with pytest.raises(ModelError):
        local_path_for_key(tmp_path, "p/", "p/../../etc/passwd")


def test_model_info_reads_heads_limit_and_weight_size(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "text_config": {
                    "num_attention_heads": 32,
                    "num_key_value_heads": 8,
                    "max_position_embeddings": 131072,
                }
            }
        )
    )
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 24)
    info = read_model_info(tmp_path)
    assert info.num_attention_heads == 32
    assert info.num_key_value_heads == 8
    assert info.max_position_embeddings == 131072
    assert info.weight_bytes == 1024


def test_kv_heads_default_to_attention_heads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 12}))
    info = read_model_info(tmp_path)
    assert info.num_key_value_heads == 12
    assert info.max_position_embeddings is None


def test_directory_without_config_is_an_error(tmp_path: Path):
    with pytest.raises(ModelError, match=r"no config\.json"):
        read_model_info(tmp_path)


def test_shape_reads_the_text_model_and_the_dtype_vllm_runs_in():
    config = {"architectures": ["LlavaForConditionalGeneration"], "torch_dtype": "float32",
              "text_config": {"num_attention_heads": 32, "num_key_value_heads": 8,
                              "num_hidden_layers": 32, "hidden_size": 4096,
                              "max_position_embeddings": 4096}}
    auto = shape_from_config(config, 1000)
    assert (auto.head_dim, auto.kv_heads, auto.context) == (128, 8, 4096)
    assert (auto.dtype_bytes, auto.weight_bytes) == (2, 500)  # float32 runs in 16 bits
    full = shape_from_config(config, 1000, dtype="float32")
    assert (full.dtype_bytes, full.weight_bytes) == (4, 1000)
    assert full.kv_bytes(2, 10) == 2 * (2 * 8 * 128 * 4) * 32 * 10


def test_shape_refuses_a_config_without_layers():
    with pytest.raises(ModelError, match="how many layers"):
        shape_from_config({"num_attention_heads": 4, "max_position_embeddings": 16}, 1)


def test_a_remote_model_not_in_the_cache_is_not_fetched_for_the_plan(tmp_path):
    with pytest.raises(ModelError, match="org/model is not fetched yet"):
        local_model_dir("org/model", tmp_path)
    done = cache_dir_for(parse_source("org/model"), tmp_path)
    done.mkdir(parents=True)
    (done / COMPLETE_MARKER).write_text("org/model\n")
    assert local_model_dir("org/model", tmp_path) == done
