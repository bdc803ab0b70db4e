"""The remote tier's settings from a cache config and the environment (no server needed): the path, the
endpoint's precedence (AWS_ENDPOINT_URL_S3 over the file, AWS's own name left to the SDK), the Redis URL and
the bounds."""

from __future__ import annotations

import pytest

from flexkv import CacheConfig
from flexkv.core.errors import ConfigError
from flexkv.core.remote_settings import parse_remote_path, redact, remote_settings

MANUAL = {"endpoint": "s3.amazonaws.com", "bucket": "flexkv-cache"}


def cache(**custom) -> CacheConfig:
    return CacheConfig(enable_remote=True, num_remote_blocks=100, remote_cache_path="s3://flexkv-cache/",
                       remote_config_custom=custom or None)


def test_paths() -> None:
    assert parse_remote_path("s3://flexkv-cache/") == ("flexkv-cache", "")
    assert parse_remote_path("s3://b-1.x/a/b") == ("b-1.x", "a/b/")
    for bad in ("", "flexkv-cache", "http://x/", "s3:///p", "s3://ab/", "s3://UPPER/"):
        with pytest.raises(ConfigError) as err:
            parse_remote_path(bad)
        assert err.value.key == "cache_config.remote_cache_path"


def test_the_manual_config_with_the_environment() -> None:
    env = {"FLEXKV_REDIS_URL": "redis://:secret@10.0.0.2:6379/1"}
    s = remote_settings(cache(**MANUAL), env)
    assert (s.bucket, s.prefix, s.endpoint_url, s.region) == ("flexkv-cache", "", None, "us-east-1")
    assert s.addressing_style == "auto" and s.redis_url == env["FLEXKV_REDIS_URL"]
    assert (s.timeout_s, s.retries) == (0.5, 1)  # a dead server costs a request at most 1 s
    assert "secret" not in s.describe() and redact(s.redis_url) == "redis://:***@10.0.0.2:6379/1"
    s = remote_settings(cache(**MANUAL), {**env, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:8333",
                                          "AWS_REGION": "eu-west-1"})
    assert (s.endpoint_url, s.addressing_style, s.region) == ("http://127.0.0.1:8333", "path", "eu-west-1")
    s = remote_settings(cache(endpoint="minio.local:9000", redis_url="redis://r:6379/0"), {})
    assert s.endpoint_url == "https://minio.local:9000"


@pytest.mark.parametrize(("custom", "key"), [
    ({"bucket": "other", "redis_url": "redis://r"}, "bucket"),
    ({}, "redis_url"),
    ({"redis_url": "r:6379"}, "redis_url"),
    ({"redis_url": "redis://r", "retries": -1}, "retries"),
    ({"redis_url": "redis://r", "max_concurrency": 0}, "max_concurrency"),
    ({"redis_url": "redis://r", "addressing_style": "dns"}, "addressing_style"),
    ({"redis_url": "redis://r", "endpoint": "ftp://x"}, "endpoint"),
    ({"redis_url": "redis://r", "secret_key": "x"}, "secret_key"),
])
def test_bad_settings_name_their_key(custom: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        remote_settings(cache(**custom), {})
    assert err.value.key == f"cache_config.remote_config_custom.{key}", str(err.value)


def test_the_page_store_runs_without_the_remote_tier(caplog: pytest.LogCaptureFixture) -> None:
    from flexkv import ModelConfig
    from flexkv.core.page_store import PageStore

    store = PageStore(ModelConfig(num_layers=1, num_kv_heads=1, head_size=8, dtype="float16"),
                      CacheConfig(num_cpu_blocks=8, enable_remote=True, num_remote_blocks=10), namespace="",
                      layout_tag="")
    try:
        assert not store.cache_config.enable_remote
        assert "not used by the page store" in caplog.text
    finally:
        store.close()


def test_check_config_shows_the_remote_tier(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from flexkv.core.check_config import main

    manual = str(Path(__file__).resolve().parents[1] / "examples" / "configs" / "distributed_worker.json")
    for name in ("FLEXKV_REDIS_URL", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:8333")
    monkeypatch.setenv("worker_id", "0")  # the manual's ${worker_id}
    assert main([manual, "--model", "tiny", "--skip-resources"]) == 1
    assert "FLEXKV_REDIS_URL" in capsys.readouterr().err
    monkeypatch.setenv("FLEXKV_REDIS_URL", "redis://127.0.0.1:6379/0")
    assert main([manual, "--model", "tiny", "--skip-resources"]) == 0
    out = capsys.readouterr().out
    assert "REMOTE tier" in out and "20000000 blocks" in out
    assert "remote tier: s3://flexkv-cache/ at http://127.0.0.1:8333, index redis://127.0.0.1:6379/0" in out
