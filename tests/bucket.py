"""Reading a store the way a new node would, from the bucket alone: the newest journal snapshot and the
segments it does not cover, merged."""

from __future__ import annotations

from ckptfs.backend.base import ObjectStore
from ckptfs.tier.fetch import read_file
from ckptfs.tier.layout import read_pack_index
from ckptfs.tier.recover import read_journal


def view(store: ObjectStore) -> dict[str, dict]:
    """The namespace as a new node reads it: the newest journal snapshot and the segments it does not cover."""
    return {p: ev for p, (_, ev) in read_journal(store, strict=True).winners.items() if ev["kind"] != "gone"}


def files(store: ObjectStore) -> dict[str, bytes]:
    """Every file path in the bucket's namespace and its bytes, decoded and verified."""
    return {p: read_file(store, ev) for p, ev in view(store).items() if ev["kind"] == "file"}


def frames(store: ObjectStore) -> list[tuple[str, str, int, int]]:
    """Every frame in the bucket's packs: (chunk id hex, pack key, offset, length)."""
    out = []
    for key in store.list("packs/"):
        out += [(cid.hex(), key, off, n) for cid, _, off, n in read_pack_index(store.get(key))]
    return out


def s3_store(server, bucket: str, prefix: str = ""):
    from ckptfs.backend.s3 import S3Settings, S3Store
    from tests.s3server import ACCESS_KEY, SECRET_KEY

    return S3Store(S3Settings(bucket=bucket, prefix=prefix, endpoint=server.endpoint, region="us-east-1",
                              access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, retries=3))
