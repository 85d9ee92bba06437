"""The node daemon: pre-flight checks, wiring of every component, the trio main loop, clean shutdown.

Shutdown: on unmount (``ckptfs umount`` / ``fusermount3 -u``) or SIGTERM/SIGINT, the daemon stops
serving FUSE, unmounts, gives the ingester up to ``mount.drain_seconds`` to chunk what is staged,
and exits 0. Whatever is still staged is re-ingested at the next mount. If the daemon hits an
unexpected error it exits *without* unmounting: the mountpoint then answers ENOTCONN instead of
silently becoming a plain directory that training would write into.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from ckptfs.backend import open_store
from ckptfs.cache import ChunkCache
from ckptfs.config import Config, MiB
from ckptfs.errors import BackendError, UserError
from ckptfs.files import ChunkIndex, ChunkReader, FileContents, Ingester, StagingArea, Workers
from ckptfs.files.ingest import IngestSettings
from ckptfs.fuse import Operations
from ckptfs.meta import Database
from ckptfs.namespace import Tree
from ckptfs.types import InodeId, VersionId

log = logging.getLogger(__name__)

DB_NAME = "meta.db"
PID_NAME = "ckptfs.pid"
LOCK_NAME = "lock"
LOG_NAME = "ckptfs.log"


def preflight(cfg: Config, mountpoint: str) -> None:
    """Check everything a mount needs; raise ``UserError`` with one clear line on the first problem."""
    mp = Path(mountpoint)
    if not mp.exists():
        raise UserError(f"mountpoint {mountpoint} does not exist")
    if not mp.is_dir():
        raise UserError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mp):
        raise UserError(f"mountpoint {mountpoint} is already a mount point (is ckptfs already mounted there?)")
    try:
        fd = os.open(cfg.mount.fuse_device, os.O_RDWR)
        os.close(fd)
    except FileNotFoundError:
        raise UserError(
            f"FUSE device {cfg.mount.fuse_device} is missing (modprobe fuse; apt-get install fuse3)"
        ) from None
    except PermissionError:
        raise UserError(f"no permission to open the FUSE device {cfg.mount.fuse_device}") from None
    except OSError as exc:
        raise UserError(f"cannot open the FUSE device {cfg.mount.fuse_device}: {exc.strerror}") from None
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise UserError("fusermount3 is not installed (apt-get install fuse3)")
    cache = Path(cfg.cache.dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, prefix=".probe"):
            pass
    except OSError as exc:
        raise UserError(f"cache directory {cache} is not writable: {exc.strerror or exc}") from None
    if cache.resolve() == mp.resolve() or mp.resolve() in cache.resolve().parents:
        raise UserError("the cache directory must not be inside the mountpoint")
    try:
        open_store(cfg.store.url).check()
    except BackendError as exc:
        raise UserError(f"store: {exc}") from None


def lock_cache(cache_dir: str) -> int:
    """Take the cache directory's lock for this process. Raises ``UserError`` if another daemon has it."""
    path = Path(cache_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            pid = read_pid(cache_dir)
            who = f" (pid {pid})" if pid else ""
            raise UserError(f"another ckptfs daemon{who} is already using cache directory {cache_dir}") from None
        raise
    return fd


def read_pid(cache_dir: str) -> int | None:
    try:
        return int((Path(cache_dir) / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def _sd_notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


class _Components:
    """Every long-lived object of one mount, built in dependency order (bottom-up)."""

    def __init__(self, cfg: Config) -> None:
        cache_dir = cfg.cache.dir
        self.db = Database(Path(cache_dir) / DB_NAME)
        # Ingest stops at half the reserve, so namespace operations (unlink to free space!) still fit.
        self.cache = ChunkCache(
            cache_dir,
            min_free=cfg.cache.reserve_mb * MiB // 2,
            direct_io=cfg.cache.direct_io,
            db_path=self.db.path,
        )
        self.cache.sweep_tmp()
        self.workers = Workers.create(cfg.ingest.threads, cfg.ingest.nice)
        self.chunks = ChunkIndex(self.db, self.cache)
        self.reader = ChunkReader(self.db, self.cache, self.workers, cfg.cache.decoded_cache_mb * MiB)
        self.staging = StagingArea(cache_dir)
        settings = IngestSettings(
            piece_size=cfg.ingest.piece_mb * MiB,
            cdc_avg=cfg.ingest.cdc_avg_kb * 1024,
            zstd_level=cfg.ingest.zstd_level,
            files_at_once=cfg.ingest.files_at_once,
            parallel_pieces=max(4, cfg.ingest.threads * 2),  # some in flight wait on the disk (fsync)
            max_chain=cfg.ingest.max_chain,
            base_grace_s=cfg.ingest.base_grace_s,
            base_cache_bytes=cfg.ingest.base_cache_mb * MiB,
            pco_level=cfg.ingest.pco_level,
        )
        self.contents = FileContents(
            self.db,
            self.staging,
            self.chunks,
            self.reader,
            self.workers,
            cfg.cache.reserve_mb * MiB,
            self._sealed,
        )
        self.ingester = Ingester(self.contents, self.chunks, self.workers, settings)
        self.tree = Tree(self.db, self.contents)

    def _sealed(self, inode: InodeId, vid: VersionId) -> None:
        self.ingester.submit(inode, vid)


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("received signal %d; unmounting", sig)
            pyfuse3.terminate()
            return


async def _serve(cfg: Config, mountpoint: str, c: _Components, ready: Callable[[str | None], None]) -> None:
    recovered = c.contents.recover()
    purged = c.tree.purge_orphans()
    c.chunks.recover_rebases()
    collected = c.chunks.collect()
    if recovered or purged or collected:
        log.info(
            "recovery: %d staged versions re-queued, %d orphan inodes purged, %d chunks collected",
            len(recovered),
            purged,
            collected,
        )
    options = set(pyfuse3.default_options)
    options |= {f"fsname=ckptfs:{cfg.cache.dir}", "subtype=ckptfs"}
    if cfg.mount.allow_other and os.geteuid() == 0:
        options.add("allow_other")
    pyfuse3.init(Operations(c.tree, cfg.cache.dir), mountpoint, options)
    clean = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(c.ingester.run)
            for act in recovered:
                c.ingester.submit(act.inode, act.version)
            nursery.start_soon(_watch_signals)
            log.info("mounted %s (cache %s, store %s)", mountpoint, cfg.cache.dir, cfg.store.url)
            ready(None)
            _sd_notify("READY=1")
            await pyfuse3.main()
            clean = True
            _sd_notify("STOPPING=1")
            pyfuse3.close(unmount=True)
            log.info("unmounted %s; draining %d staged versions", mountpoint, c.ingester.pending)
            with trio.move_on_after(cfg.mount.drain_seconds):
                await c.ingester.wait_idle()
            if c.ingester.pending:
                log.info("%d versions stay staged; they are ingested at the next mount", c.ingester.pending)
            nursery.cancel_scope.cancel()
    finally:
        if not clean:
            # Keep the mount (it answers ENOTCONN) rather than exposing the plain directory below.
            pyfuse3.close(unmount=False)


def run(cfg: Config, mountpoint: str, ready: Callable[[str | None], None]) -> int:
    """Mount and serve until unmounted. ``ready(None)`` once mounted, ``ready(message)`` on a pre-flight error."""
    try:
        preflight(cfg, mountpoint)
        lock_fd = lock_cache(cfg.cache.dir)
    except UserError as exc:
        ready(str(exc))
        raise
    pid_path = Path(cfg.cache.dir) / PID_NAME
    pid_path.write_text(f"{os.getpid()}\n")
    try:
        c = _Components(cfg)
        try:
            trio.run(_serve, cfg, mountpoint, c, ready)
        finally:
            c.db.checkpoint()
            c.db.close()
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            log.critical("daemon failed: %r", exc, exc_info=True)
        ready(f"daemon failed: {exc!r}")
        return 2
    finally:
        pid_path.unlink(missing_ok=True)
        os.close(lock_fd)
    log.info("daemon exited cleanly")
    return 0
