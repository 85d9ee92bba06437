"""Mounting against an S3 store (a real SeaweedFS server on loopback): clear one-line errors for a
missing bucket, bad credentials and an unreachable endpoint; ``--create-bucket``; boto3's standard
environment chain for endpoint and credentials."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.s3


def _mount(tmp_path, env, store, *extra):
    (tmp_path / "mnt").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "ckptfs", "mount", "--cache", str(tmp_path / "cache"), "--store", store, *extra,
         str(tmp_path / "mnt")],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=120,
    )


def _umount(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ckptfs", "umount", str(tmp_path / "mnt")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_missing_bucket_is_one_line_and_create_bucket_creates_it(tmp_path, s3_server):
    bucket = "t-" + uuid.uuid4().hex[:12]
    res = _mount(tmp_path, s3_server.env(), f"s3://{bucket}/ckpt")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"bucket '{bucket}' does not exist at {s3_server.endpoint}" in lines[0]
    assert "--create-bucket" in lines[0]
    res = _mount(tmp_path, s3_server.env(), f"s3://{bucket}/ckpt", "--create-bucket")
    assert res.returncode == 0, res.stderr
    try:
        (tmp_path / "mnt" / "a").write_bytes(b"x")
        assert (tmp_path / "mnt" / "a").read_bytes() == b"x"
        assert bucket in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    finally:
        _umount(tmp_path)


def test_bad_credentials_and_unreachable_endpoint_are_named_without_secrets(tmp_path, s3_server, s3_bucket):
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret-XYZ"}
    res = _mount(tmp_path, env, f"s3://{s3_bucket}")
    assert res.returncode == 1
    assert "access denied" in res.stderr and "check the credentials" in res.stderr
    assert "not-the-secret-XYZ" not in res.stderr
    env = {**s3_server.env(), "CKPTFS_S3_ENDPOINT": "http://127.0.0.1:9", "CKPTFS_S3_RETRIES": "2"}
    res = _mount(tmp_path, env, f"s3://{s3_bucket}")
    assert res.returncode == 1
    assert "cannot reach the object store" in res.stderr and "127.0.0.1:9" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not os.path.ismount(tmp_path / "mnt")
