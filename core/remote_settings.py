"""The remote tier's settings: where its objects live (``remote_cache_path``), how to reach the object store
and the Redis index (``remote_config_custom``, the AWS environment, ``FLEXKV_REDIS_URL``) and how long a
request may take. Every mistake is a ConfigError naming the key and the fix.

``remote_config_custom`` keys (all optional but ``bucket`` may come from the path):

- ``endpoint``: the S3 endpoint (``s3.amazonaws.com``, ``http://127.0.0.1:8333``); ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` in the environment replace it (as for every AWS tool);
- ``bucket``: must match the bucket of ``remote_cache_path``;
- ``region`` (default ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1``);
- ``addressing_style``: ``path``, ``virtual`` or ``auto`` (default: ``path`` for a custom endpoint);
- ``redis_url`` (default ``FLEXKV_REDIS_URL``, required one way or the other), e.g. ``redis://host:6379/0``;
- ``timeout_s`` (default 0.5): the connect and read timeout of one request to S3 or Redis;
- ``retries`` (default 1): extra attempts of a failed request (so a dead server costs at most
  ``(1 + retries) * timeout_s``, 1 s by default, per request before the circuit breaker stops calling it);
- ``breaker_cooldown_s`` (default 5.0): how long the breaker waits before it probes a dead server again;
- ``max_concurrency`` (default 16): requests in flight to S3 at once;
- ``write_queue_blocks`` (default 65536): blocks waiting for write-through; more are skipped and counted.

Credentials come from the standard AWS chain (environment, profiles, instance roles): never from the config.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from .config import CacheConfig
from .errors import ConfigError

_K = "cache_config.remote_config_custom"
_PATH_KEY = "cache_config.remote_cache_path"
_KNOWN = ("endpoint", "bucket", "region", "addressing_style", "redis_url", "timeout_s", "retries",
          "breaker_cooldown_s", "max_concurrency", "write_queue_blocks")


@dataclasses.dataclass(frozen=True)
class RemoteSettings:
    bucket: str
    prefix: str  # "" or ends with "/"
    endpoint_url: str | None  # None: AWS's own endpoint for the region
    region: str
    addressing_style: str
    redis_url: str
    timeout_s: float = 0.5
    retries: int = 1
    breaker_cooldown_s: float = 5.0
    max_concurrency: int = 16
    write_queue_blocks: int = 65536
    num_blocks: int = 1

    def describe(self) -> str:
        where = self.endpoint_url or f"AWS S3 ({self.region})"
        return (f"s3://{self.bucket}/{self.prefix} at {where}, index {redact(self.redis_url)}, "
                f"timeout {self.timeout_s:g} s x {1 + self.retries} attempts")


def redact(url: str) -> str:
    """A URL without its password."""
    p = urlparse(url)
    if p.password:
        return url.replace(f":{p.password}@", ":***@", 1)
    return url


def _number(custom: Mapping[str, Any], name: str, default: float, *, integer: bool, low: float) -> Any:
    value = custom.get(name, default)
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool) and value >= low
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{_K}.{name} must be {kind} >= {low:g}, got {value!r}", f"{_K}.{name}")
    return int(value) if integer else float(value)


def parse_remote_path(path: Any) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix/``; ConfigError naming remote_cache_path otherwise."""
    fix = "give it as s3://<bucket>/<optional prefix>/, e.g. \"s3://flexkv-cache/\""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{_PATH_KEY} is required when enable_remote is true; {fix}", _PATH_KEY)
    p = urlparse(path.strip())
    if p.scheme != "s3" or not p.netloc or p.query or p.fragment:
        raise ConfigError(f"{_PATH_KEY} = {path!r} is not an S3 path; {fix}", _PATH_KEY)
    bucket = p.netloc
    if not (3 <= len(bucket) <= 63) or not all(c.islower() or c.isdigit() or c in ".-" for c in bucket):
        raise ConfigError(f"{_PATH_KEY} = {path!r}: {bucket!r} is not a valid bucket name (3-63 lower-case "
                          f"letters, digits, '.' or '-'); {fix}", _PATH_KEY)
    prefix = p.path.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def _endpoint(custom: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    raw = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or custom.get("endpoint")
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{_K}.endpoint must be a host or URL such as \"s3.amazonaws.com\" or "
                          f"\"http://127.0.0.1:8333\", got {raw!r}", f"{_K}.endpoint")
    raw = raw.strip()
    url = raw if "://" in raw else f"https://{raw}"
    p = urlparse(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise ConfigError(f"{_K}.endpoint = {raw!r} is not an http(s) URL or host name", f"{_K}.endpoint")
    if p.hostname == "s3.amazonaws.com":
        return None  # AWS's global name: the SDK picks the regional endpoint
    return url


def remote_settings(cache_config: CacheConfig, env: Mapping[str, str] | None = None) -> RemoteSettings:
    """The remote tier's settings from a validated cache config with enable_remote, and the environment."""
    env = os.environ if env is None else env
    bucket, prefix = parse_remote_path(cache_config.remote_cache_path)
    custom = dict(cache_config.remote_config_custom or {})
    unknown = sorted(set(custom) - set(_KNOWN))
    if unknown:
        raise ConfigError(f"{_K} has unknown key(s) {', '.join(unknown)}; known: {', '.join(_KNOWN)}",
                          f"{_K}.{unknown[0]}")
    if "bucket" in custom and custom["bucket"] != bucket:
        raise ConfigError(f"{_K}.bucket = {custom['bucket']!r} does not match the bucket of {_PATH_KEY} "
                          f"({cache_config.remote_cache_path!r}); make them the same or drop "
                          f"remote_config_custom.bucket", f"{_K}.bucket")
    endpoint = _endpoint(custom, env)
    region = custom.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not isinstance(region, str):
        raise ConfigError(f"{_K}.region must be a string such as \"us-east-1\", got {region!r}", f"{_K}.region")
    style = custom.get("addressing_style", "path" if endpoint else "auto")
    if style not in ("path", "virtual", "auto"):
        raise ConfigError(f"{_K}.addressing_style must be \"path\", \"virtual\" or \"auto\", got {style!r}",
                          f"{_K}.addressing_style")
    redis_url = custom.get("redis_url") or env.get("FLEXKV_REDIS_URL")
    if not redis_url:
        raise ConfigError(f"enable_remote needs the remote tier's Redis index: set {_K}.redis_url (e.g. "
                          "\"redis://127.0.0.1:6379/0\") or FLEXKV_REDIS_URL", f"{_K}.redis_url")
    if not isinstance(redis_url, str) or urlparse(redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{_K}.redis_url = {redis_url!r} is not a Redis URL; use redis://host:port/db, "
                          "rediss://... (TLS) or unix:///path", f"{_K}.redis_url")
    return RemoteSettings(
        bucket=bucket, prefix=prefix, endpoint_url=endpoint, region=region, addressing_style=style,
        redis_url=redis_url,
        timeout_s=_number(custom, "timeout_s", 0.5, integer=False, low=0.01),
        retries=_number(custom, "retries", 1, integer=True, low=0),
        breaker_cooldown_s=_number(custom, "breaker_cooldown_s", 5.0, integer=False, low=0.0),
        max_concurrency=_number(custom, "max_concurrency", 16, integer=True, low=1),
        write_queue_blocks=_number(custom, "write_queue_blocks", 65536, integer=True, low=1),
        num_blocks=int(cache_config.num_remote_blocks or 1),
    )


__all__ = ["RemoteSettings", "parse_remote_path", "redact", "remote_settings"]
