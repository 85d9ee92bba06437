"""The S3 backend against a server that answers 503 SlowDown and resets connections (a fault-injecting
proxy in front of a real SeaweedFS): transient faults are retried with backoff and succeed; faults that
never stop end in a TransientBackendError naming the key and the last error; nothing is half-written."""

from __future__ import annotations

import os

import pytest

from ckptfs.backend.s3 import S3Settings, S3Store
from ckptfs.errors import TransientBackendError
from tests.faultproxy import FaultProxy, Plan
from tests.s3server import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.s3


@pytest.fixture
def proxied(s3_server):
    proxy = FaultProxy(s3_server.ports["s3.port"])
    bucket = s3_server.new_bucket()
    store = S3Store(
        S3Settings(
            bucket=bucket,
            endpoint=proxy.endpoint,
            region="us-east-1",
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            retries=6,
            multipart_bytes=5 * 1024 * 1024,
            timeout_s=5,
        )
    )
    yield proxy, store
    proxy.close()


@pytest.mark.parametrize("kind", ["503", "reset", "mixed"])
def test_transient_faults_are_retried(proxied, kind):
    proxy, store = proxied
    proxy.plan = Plan(every=2, kind=kind)  # every other request fails
    blobs = {f"k/{i}": os.urandom(100_000 + i) for i in range(6)}
    for k, v in blobs.items():
        store.put(k, v)
    for k, v in blobs.items():
        assert store.get(k) == v
        assert store.get(k, 10, 20) == v[10:30]
        assert store.head(k) == len(v)
    assert sorted(store.list("k/")) == sorted(blobs)
    big = os.urandom(11 * 1024 * 1024)  # multipart: parts retried one by one
    store.put("big", big)
    assert store.get("big") == big
    assert sum(proxy.faults.values()) >= 10


def test_faults_that_never_stop_are_reported_by_name(proxied):
    proxy, store = proxied
    proxy.plan = Plan(every=1, kind="503")
    with pytest.raises(TransientBackendError) as e:
        store.put("chunks/ab/x", b"data")
    msg = str(e.value)
    assert "chunks/ab/x" in msg and "failed 6 times" in msg and "SlowDown" in msg
    proxy.plan = Plan()
    with pytest.raises(Exception):  # noqa: B017 - nothing of it was stored
        store.head("chunks/ab/x")
    proxy.plan = Plan(every=1, kind="reset")
    with pytest.raises(TransientBackendError, match="failed 6 times"):
        store.get("nothing")
