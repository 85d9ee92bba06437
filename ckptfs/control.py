"""The daemon's control socket, ``<cache>/control.sock``: ``ckptfs status`` and ``ckptfs flush`` talk to it.

The socket is created 0600 inside the 0700 cache directory, so only the daemon's user (and root) can
connect. One JSON request per connection, one JSON reply:

* ``{"op": "status"}`` -> queue depth, bytes pending, oldest pending age, upload rate, cache use, last error;
* ``{"op": "flush", "path": "run7", "timeout": 60}`` -> ``{"ok": true}`` once every path under it is in the
  store's journal, else ``{"ok": false, "missing": [...]}`` when the timeout passes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import xxhash

from ckptfs.cache import ChunkCache
from ckptfs.errors import UserError
from ckptfs.meta import Database
from ckptfs.tier import Uploader
from ckptfs.tier.warm import warm

log = logging.getLogger(__name__)
SOCKET_NAME = "control.sock"
_MAX_REQUEST = 64 * 1024
_MAX_PATH = 100  # sockaddr_un holds 108 bytes


def socket_paths(cache_dir: str) -> list[Path]:
    """Where the socket may be, in order: ``<cache>/control.sock``, then (for a cache path too long for a
    socket address, or a file system without sockets) a file named by the cache's hash in a 0700
    directory of this user under the temp directory (refused if someone else owns it)."""
    paths = []
    path = Path(cache_dir) / SOCKET_NAME
    if len(os.fsencode(path)) <= _MAX_PATH:
        paths.append(path)
    folder = Path(tempfile.gettempdir()) / f"ckptfs-{os.geteuid()}"
    paths.append(folder / (xxhash.xxh64_hexdigest(os.fsencode(os.path.abspath(cache_dir))) + ".sock"))
    return paths


def _private_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{folder} is not a private directory of this user")


class ControlServer:
    def __init__(
        self,
        cache_dir: str,
        uploader: Uploader | None,
        extra: Callable[[], dict[str, Any]],
        db: Database | None = None,
        cache: ChunkCache | None = None,
    ) -> None:
        self.db = db
        self.cache = cache
        self.paths = socket_paths(cache_dir)
        self.path: Path | None = None
        self.uploader = uploader
        self.extra = extra  # store URL, failsafe, cache use: what the daemon knows

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. No usable place for the socket is logged, and the mount goes on."""
        sock = None
        problems = []
        for path in self.paths:
            candidate = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # bound right here, not in a thread: no other file is created meanwhile
            try:
                if path.name != SOCKET_NAME:  # the fallback, under the shared temp directory
                    _private_folder(path.parent)
                path.unlink(missing_ok=True)
                candidate.bind(str(path))
                os.chmod(path, 0o600)
                sock, self.path = trio.socket.from_stdlib_socket(candidate), path
                break
            except OSError as exc:
                candidate.close()
                problems.append(f"{path}: {exc}")
            finally:
                os.umask(old)
        task_status.started()
        if sock is None:
            log.warning(
                "no control socket (ckptfs status and flush will not reach this daemon): %s", "; ".join(problems)
            )
            return
        for stale in self.paths:
            if stale != self.path and stale.is_socket():
                stale.unlink(missing_ok=True)  # a previous daemon's, which a client would try first
        sock.listen(16)
        bound = path
        try:
            await trio.serve_listeners(self._handle, [trio.SocketListener(sock)])
        finally:
            bound.unlink(missing_ok=True)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One request. Nothing a client does (going away mid-answer, sending junk) may end the daemon:
        every error ends this connection only."""
        try:
            await self._serve_one(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away (a flush or warmup interrupted with ^C)
        except Exception:
            log.exception("control request failed")

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                buf = b""
                while not buf.endswith(b"\n") and len(buf) < _MAX_REQUEST:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    buf += data
                req = json.loads(buf or b"{}")
                if req.get("op") == "warmup":
                    reply = await self.warmup(req, stream)
                else:
                    reply = await self.answer(req)
            except (ValueError, TypeError, AttributeError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "flush":
            if self.uploader is None:
                return {"ok": False, "error": "uploads are disabled (upload.enabled = false)"}
            rel = str(req.get("path", "")).strip("/")
            prefix = os.fsencode("/" + rel) if rel else b""
            timeout = float(req.get("timeout", 0))
            missing = await self.uploader.flush(prefix, timeout)
            return {"ok": not missing, "missing": missing}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def warmup(self, req: dict[str, Any], stream: trio.SocketStream) -> dict[str, Any]:
        """Fetch the files' frames into the cache; a progress line at most every 0.2 s, then the result."""
        if self.cache is None or self.db is None or self.cache.remote is None:
            return {"ok": False, "error": "this daemon has no store to warm up from"}
        prefixes = [os.fsencode("/" + str(p).strip("/")) if str(p).strip("/") else b"" for p in req.get("paths", [""])]
        last = [0.0]
        lines: list[bytes] = []

        def progress(done: int, total: int, nbytes: int, total_bytes: int) -> None:
            now = trio.current_time()
            if now - last[0] >= 0.2 or done == total:
                last[0] = now
                lines.append(json.dumps({"progress": [done, total, nbytes, total_bytes]}).encode() + b"\n")

        async def pump() -> None:
            try:
                while True:
                    while lines:
                        await stream.send_all(lines.pop(0))
                    await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                lines.clear()  # the client went away; the warm-up goes on (it only fills the cache)
                await trio.sleep_forever()

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            jobs = max(1, min(64, int(req.get("jobs", 8))))
            files, fetched, errors = await warm(self.db, self.cache, prefixes, jobs, progress)
            nursery.cancel_scope.cancel()
        for line in lines:
            await stream.send_all(line)
        lines.clear()
        secs = trio.current_time() - start
        return {"ok": not errors, "files": files, "fetched_bytes": fetched, "seconds": secs, "errors": errors[:20]}

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra())
        up = self.uploader
        if up is None:
            out["upload"] = None
            return out
        q = up.tiering.summary()
        out["upload"] = {
            "writer": up.writer,
            "queued_versions": q.versions,
            "queued_bytes": q.size,
            "chunks_not_in_store": up.tiering.chunks_not_in_store(),
            "oldest_pending_s": None if q.oldest_ns is None else round((time.time_ns() - q.oldest_ns) / 1e9, 3),
            "rate_bytes_per_s": round(up.rate()),
            "bytes_sent": up.stats.bytes_sent,
            "objects_sent": up.stats.objects_sent,
            "journal_segments": up.stats.segments,
            "requests": getattr(up.store, "requests", None),  # S3 requests sent, retries included
            "last_error": up.stats.last_error,
            "last_error_age_s": None
            if up.stats.last_error_ns is None
            else round((time.time_ns() - up.stats.last_error_ns) / 1e9, 1),
            "failing": [
                {"path": None if p is None else os.fsdecode(p), "attempts": a, "error": e} for p, a, e in q.failing
            ],
        }
        return out


def request(
    cache_dir: str,
    req: dict[str, Any],
    timeout: float | None = 30.0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Client side (the CLI): send ``req`` to the daemon of ``cache_dir``; ``progress`` gets the progress
    lines that come before the reply. Raises ``UserError``."""
    found = [p for p in socket_paths(cache_dir) if p.is_socket()]
    if not found:
        raise UserError(f"no ckptfs daemon is serving {cache_dir} (no control socket)")
    path = found[0]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while True:
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        raise UserError(f"the ckptfs daemon of {cache_dir} sent a reply that is not JSON") from None
                    if "progress" not in msg:
                        return dict(msg)
                    if progress:
                        progress(msg)
                data = s.recv(65536)
                if not data:
                    break
                buf += data
    except FileNotFoundError:
        raise UserError(f"no ckptfs daemon is serving {cache_dir} (no {path})") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied (the control socket is for the daemon's user and root)") from None
    except ConnectionRefusedError:
        raise UserError(f"the ckptfs daemon of {cache_dir} is not answering (it may have exited)") from None
    except TimeoutError:
        raise UserError(f"the ckptfs daemon of {cache_dir} did not answer within {timeout:.0f} s") from None
    raise UserError(f"the ckptfs daemon of {cache_dir} closed the connection without answering")
