"""Open an object store from its URL: ``file:///path``, ``memory://``, ``s3://bucket/prefix``."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from ckptfs.backend.base import ObjectStore
from ckptfs.backend.local import LocalDirStore
from ckptfs.backend.memory import MemoryStore
from ckptfs.config import S3Config
from ckptfs.errors import UserError


def open_store(url: str, s3: S3Config | None = None, concurrency: int = 8) -> ObjectStore:
    """Build the store for ``url`` (``s3`` says how to reach an S3 one, ``concurrency`` how many requests
    will be in flight at once). Raises ``UserError`` for an unknown or malformed URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise UserError(f"store: a file URL needs an absolute path (file:///path), got {url!r}")
        return LocalDirStore(unquote(parsed.path))
    if parsed.scheme == "memory":
        return MemoryStore()
    if parsed.scheme == "s3":
        return open_s3(url, parsed.netloc, unquote(parsed.path), s3 or S3Config(), concurrency)
    raise UserError(f"store: unknown URL scheme in {url!r} (expected file://, s3:// or memory://)")


def open_s3(url: str, bucket: str, prefix: str, cfg: S3Config, concurrency: int) -> ObjectStore:
    from ckptfs.backend.s3 import S3Settings, S3Store  # boto3 costs ~0.3 s to import: only when used

    if not bucket or not all(ch.isalnum() or ch in "-." for ch in bucket) or not 3 <= len(bucket) <= 63:
        raise UserError(f"store: {url!r} does not name a valid bucket (s3://bucket/prefix)")
    settings = S3Settings(
        bucket=bucket,
        prefix=prefix.strip("/"),
        endpoint=cfg.endpoint,
        region=cfg.region,
        addressing_style=cfg.addressing_style,
        profile=cfg.profile,
        access_key_id=cfg.access_key_id,
        secret_access_key=cfg.secret_access_key,
        concurrency=concurrency,
        retries=cfg.retries,
        multipart_bytes=cfg.multipart_mb * 1024 * 1024,
        timeout_s=cfg.timeout_s,
    )
    try:
        return S3Store(settings)
    except Exception as exc:  # botocore: an unknown profile, a malformed endpoint, ...
        raise UserError(f"store: cannot set up {url}: {exc}") from None
