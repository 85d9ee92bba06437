"""One contract for every object store: local directory, memory, and S3 (a real SeaweedFS server).

What the uploader and cold reads rely on: whole-object atomic puts, exact ranged gets (including
ranges past the end), ``ObjectNotFound`` for a missing key from both ``get`` and ``head``, idempotent
deletes, listing by prefix (complete, whatever its order), overwrites of a key with identical bytes,
and objects larger than one multipart part.
"""

from __future__ import annotations

import os
import threading

import pytest

from ckptfs.backend import LocalDirStore, MemoryStore
from ckptfs.errors import ObjectNotFound


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalDirStore(tmp_path / "objects")
    if request.param == "memory":
        return MemoryStore()
    from ckptfs.backend.s3 import S3Settings, S3Store
    from tests.s3server import ACCESS_KEY, SECRET_KEY

    server = request.getfixturevalue("s3_server")
    return S3Store(
        S3Settings(
            bucket=server.new_bucket(),
            prefix="some/prefix",
            endpoint=server.endpoint,
            region="us-east-1",
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            multipart_bytes=5 * 1024 * 1024,
            retries=3,
        )
    )


def test_put_get_roundtrip(store):
    store.check()
    store.put("chunks/ab/abcdef.0123", b"frame bytes")
    assert store.get("chunks/ab/abcdef.0123") == b"frame bytes"
    assert store.head("chunks/ab/abcdef.0123") == len(b"frame bytes")


def test_ranges(store):
    data = bytes(range(256)) * 16
    store.put("packs/00/p", data)
    assert store.get("packs/00/p", 0, 10) == data[:10]
    assert store.get("packs/00/p", 100, 50) == data[100:150]
    assert store.get("packs/00/p", 4000) == data[4000:]
    assert store.get("packs/00/p", 4090, 100) == data[4090:]  # a range running past the end is cut
    assert store.get("packs/00/p", len(data)) == b""
    assert store.get("packs/00/p", len(data) + 5, 3) == b""
    assert store.get("packs/00/p", 7, 0) == b""


def test_missing_key(store):
    with pytest.raises(ObjectNotFound):
        store.get("nope")
    with pytest.raises(ObjectNotFound):
        store.get("nope", 10, 5)
    with pytest.raises(ObjectNotFound):
        store.head("nope")
    with pytest.raises(ObjectNotFound):
        store.get("nope", 0, 0)


def test_delete_is_idempotent(store):
    store.put("x/y", b"1")
    store.delete("x/y")
    store.delete("x/y")
    with pytest.raises(ObjectNotFound):
        store.head("x/y")


def test_list_by_prefix(store):
    keys = {f"journal/node-a.{i:02x}/{j:012d}" for i in range(3) for j in range(4)} | {"journal-other", "packs/aa/1"}
    for k in keys:
        store.put(k, k.encode())
    assert set(store.list("journal/")) == {k for k in keys if k.startswith("journal/")}
    assert set(store.list("journal/node-a.01/")) == {k for k in keys if k.startswith("journal/node-a.01/")}
    assert set(store.list("")) >= keys
    assert list(store.list("absent/")) == []


def test_list_pages_through_many_keys(store):
    keys = [f"many/{i:05d}" for i in range(1100)]  # S3 returns 1000 per page
    threads = [threading.Thread(target=lambda ks=keys[i::8]: [store.put(k, b"") for k in ks]) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(store.list("many/")) == keys


def test_overwrite_with_identical_bytes_and_empty_object(store):
    store.put("same", b"abc")
    store.put("same", b"abc")
    assert store.get("same") == b"abc"
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.head("empty") == 0


def test_large_object(store):
    data = os.urandom(11 * 1024 * 1024 + 17)  # three multipart parts on S3
    store.put("big/frame", data)
    assert store.head("big/frame") == len(data)
    assert store.get("big/frame") == data
    assert store.get("big/frame", 5 * 1024 * 1024 - 3, 10) == data[5 * 1024 * 1024 - 3 : 5 * 1024 * 1024 + 7]


def test_bad_keys_are_refused(store):
    for key in ("/abs", "a/../b"):
        with pytest.raises(ValueError):
            store.put(key, b"x")


def test_concurrent_puts_and_gets(store):
    blobs = {f"c/{i}": os.urandom(1000 + i) for i in range(40)}
    errors: list[BaseException] = []

    def work(items):
        try:
            for k, v in items:
                store.put(k, v)
                assert store.get(k) == v
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    items = list(blobs.items())
    threads = [threading.Thread(target=work, args=(items[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert {k: store.get(k) for k in blobs} == blobs


def test_list_info_gives_sizes_and_put_times(store):
    import time

    before = time.time_ns()
    store.put("gcl/a", b"12345")
    store.put("gcl/b", b"")
    infos = {i.key: i for i in store.list_info("gcl/")}
    assert set(infos) == {"gcl/a", "gcl/b"}
    assert (infos["gcl/a"].size, infos["gcl/b"].size) == (5, 0)
    for info in infos.values():  # the store's clock: loopback or this host, so within a few seconds
        assert abs(info.mtime_ns - before) < 5e9
    assert list(store.list_info("absent/")) == []
