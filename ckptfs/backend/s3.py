"""S3-compatible object storage (AWS S3, MinIO, Ceph RGW, SeaweedFS) through boto3.

* One client, built on the constructing thread (boto3 sessions are not thread-safe, clients are), with
  a connection pool sized to the concurrency that uses it.
* Request and response checksums ``when_required``: botocore >= 1.36 otherwise adds CRC trailers to
  every request, which several S3-compatible servers reject.
* botocore's own retries are off; ``_call`` retries transient failures (5xx, SlowDown and throttling,
  timeouts, connection errors, short reads) with exponential backoff and full jitter, and gives up
  after ``retries`` attempts with a ``TransientBackendError`` naming the key and the last error — the
  caller (the uploader) keeps its item queued. Permanent failures (403, a missing bucket, bad
  credentials, any other 4xx) raise ``PermanentBackendError`` at once, by name.
* Objects above ``multipart_bytes`` go up as multipart uploads, parts in parallel; a failed one is aborted.
* Messages name the endpoint, bucket and key, never credentials.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from ckptfs.backend.base import ObjectInfo, checked_key
from ckptfs.errors import ObjectNotFound, PermanentBackendError, TransientBackendError

log = logging.getLogger(__name__)
T = TypeVar("T")

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "TooManyRequests",
}
_TRANSIENT_IO = (
    botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
    botocore.exceptions.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    botocore.exceptions.IncompleteReadError,
    ConnectionError,  # a reset while reading a body, below botocore
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class S3Settings:
    """How to reach the bucket. Empty strings mean boto3's standard chain decides (environment,
    ``~/.aws/config``, instance metadata)."""

    bucket: str
    prefix: str = ""
    endpoint: str = ""
    region: str = ""
    addressing_style: str = "auto"  # auto | path | virtual
    profile: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    concurrency: int = 8  # requests in flight at once (sizes the connection pool)
    retries: int = 8  # attempts per request before a transient failure is reported
    multipart_bytes: int = 64 * 1024 * 1024
    timeout_s: float = 30.0  # connect and read timeout of one request


class _Give(Exception):
    """Internal: a short read, retried like a connection error."""


class S3Store:
    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self._prefix = settings.prefix.strip("/") + "/" if settings.prefix.strip("/") else ""
        session = boto3.session.Session(profile_name=settings.profile or None)
        config = botocore.config.Config(
            max_pool_connections=settings.concurrency + 4,
            retries={"max_attempts": 1, "mode": "standard"},  # ours, in _call
            connect_timeout=settings.timeout_s,
            read_timeout=settings.timeout_s,
            s3={"addressing_style": settings.addressing_style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        kwargs: dict[str, Any] = {"config": config}
        if settings.endpoint:
            kwargs["endpoint_url"] = settings.endpoint
        if settings.region:
            kwargs["region_name"] = settings.region
        if settings.access_key_id:
            kwargs["aws_access_key_id"] = settings.access_key_id
            kwargs["aws_secret_access_key"] = settings.secret_access_key
        self._client = session.client("s3", **kwargs)
        self.endpoint = str(self._client.meta.endpoint_url)
        self._parts = threading.BoundedSemaphore(max(1, settings.concurrency))
        self.requests = 0  # requests sent, retries included (for benchmarks)
        self._count = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self._prefix} at {self.endpoint})"

    def _key(self, key: str) -> str:
        return self._prefix + checked_key(key)

    # -- errors and retries ---------------------------------------------------------------------------

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._prefix}{key or ''} at {self.endpoint}"

    def _call(self, what: str, key: str | None, fn: Callable[[], T], attempts: int | None = None) -> T:
        """Run ``fn`` (one request), retrying transient failures; translate errors at this boundary."""
        attempts = attempts or self.settings.retries
        delay = 0.2
        for attempt in range(1, attempts + 1):
            with self._count:
                self.requests += 1
            try:
                return fn()
            except botocore.exceptions.ClientError as exc:
                err = exc.response.get("Error", {})
                code = str(err.get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
                    raise ObjectNotFound(key or "") from None
                if code == "NoSuchBucket":
                    raise PermanentBackendError(f"bucket {self.bucket!r} does not exist at {self.endpoint}") from None
                if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise PermanentBackendError(
                        f"{what} {self._where(key)}: access denied ({code or status}); check the credentials"
                    ) from None
                if not (status >= 500 or code in _TRANSIENT_CODES):
                    raise PermanentBackendError(f"{what} {self._where(key)}: {code or status}: {exc}") from None
                last = f"{code or status}"
            except (*_TRANSIENT_IO, _Give) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt < attempts:
                time.sleep(random.uniform(0, delay))  # full jitter
                delay = min(delay * 2, 20.0)
        raise TransientBackendError(f"{what} {self._where(key)} failed {attempts} times; last error: {last}")

    # -- the interface -----------------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        k = self._key(key)
        if len(data) > self.settings.multipart_bytes:
            self._put_multipart(key, k, data)
            return
        self._call("put", key, lambda: self._client.put_object(Bucket=self.bucket, Key=k, Body=data))

    def _put_multipart(self, key: str, k: str, data: bytes) -> None:
        size = self.settings.multipart_bytes
        upload = self._call(
            "start multipart upload", key, lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=k)
        )
        uid = upload["UploadId"]

        def part(n: int) -> dict[str, Any]:
            body = data[(n - 1) * size : n * size]
            with self._parts:
                resp = self._call(
                    f"put part {n} of",
                    key,
                    lambda: self._client.upload_part(Bucket=self.bucket, Key=k, UploadId=uid, PartNumber=n, Body=body),
                )
            return {"PartNumber": n, "ETag": resp["ETag"]}

        count = -(-len(data) // size)
        try:
            with ThreadPoolExecutor(max_workers=min(4, count)) as pool:
                parts = list(pool.map(part, range(1, count + 1)))
            self._call(
                "complete multipart upload",
                key,
                lambda: self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=k, UploadId=uid, MultipartUpload={"Parts": parts}
                ),
            )
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=uid)
            except Exception as exc:  # the error that got us here matters more; the server ages it out
                log.warning("could not abort multipart upload of %s: %s", self._where(key), exc)
            raise

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        k = self._key(key)
        if length == 0:
            self.head(key)  # an empty range is not a valid Range header; the object must still exist
            return b""
        extra: dict[str, str] = {}
        if offset or length is not None:
            extra["Range"] = f"bytes={offset}-" if length is None else f"bytes={offset}-{offset + length - 1}"

        def fetch() -> bytes:
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=k, **extra)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # offset at or past the end: an empty read, as a file would give
                raise
            body: bytes = resp["Body"].read()
            expected = resp.get("ContentLength")
            if expected is not None and len(body) != int(expected):
                raise _Give(f"short read: {len(body)} of {expected} bytes")
            return body

        return self._call("get", key, fetch)

    def head(self, key: str) -> int:
        k = self._key(key)
        resp = self._call("head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=k))
        return int(resp["ContentLength"])

    def list(self, prefix: str) -> Iterator[str]:
        for info in self.list_info(prefix):
            yield info.key

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        full = self._prefix + prefix
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", prefix, lambda kw=kwargs: self._client.list_objects_v2(**kw))  # type: ignore[misc]
            for obj in resp.get("Contents", []):
                mtime = int(obj["LastModified"].timestamp() * 1e9)
                yield ObjectInfo(str(obj["Key"])[len(self._prefix) :], int(obj["Size"]), mtime)
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    def delete(self, key: str) -> None:
        k = self._key(key)
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=k))

    def check(self) -> None:
        """The bucket exists and these credentials may use it. Few attempts: a mount should fail fast."""
        try:
            self._call("check", None, lambda: self._client.head_bucket(Bucket=self.bucket), attempts=3)
        except ObjectNotFound:
            raise PermanentBackendError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint} (create it, or mount with --create-bucket)"
            ) from None
        except TransientBackendError as exc:
            raise PermanentBackendError(f"cannot reach the object store: {exc}") from None

    def create(self) -> bool:
        """Create the bucket if it does not exist; True if it was created."""
        try:
            self.check()
            return False
        except PermanentBackendError as exc:
            if "does not exist" not in str(exc):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1" and not self.settings.endpoint:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        self._call("create bucket", None, lambda: self._client.create_bucket(**kwargs), attempts=3)
        return True
