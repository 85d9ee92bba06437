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
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from ckptfs.backend import open_store
from ckptfs.cache import ChunkCache
from ckptfs.cache.remote import RemoteFrames
from ckptfs.config import Config, MiB
from ckptfs.control import ControlServer
from ckptfs.errors import BackendError, UserError
from ckptfs.files import (
    Active,
    ChunkIndex,
    ChunkReader,
    DurableMarker,
    Evictor,
    FileContents,
    Ingester,
    Reclaimer,
    StagingArea,
    Workers,
)
from ckptfs.files.flat import FlatCopies
from ckptfs.files.flatten import Flattener
from ckptfs.files.ingest import IngestSettings
from ckptfs.fsutil import fsync_dir
from ckptfs.fuse import Operations, direct_writes_supported
from ckptfs.fuse.readahead import set_read_ahead
from ckptfs.health import Health, guarded
from ckptfs.meta import Database, Versions
from ckptfs.meta.tiering import Tiering
from ckptfs.namespace import Tree
from ckptfs.tier import Uploader, prepare_store
from ckptfs.tier.gcview import GcView
from ckptfs.tier.recover import rebuild
from ckptfs.tier.refresh import Refresher
from ckptfs.types import InodeId, VersionId

log = logging.getLogger(__name__)

DB_NAME = "meta.db"
PID_NAME = "ckptfs.pid"
LOCK_NAME = "lock"
LOG_NAME = "ckptfs.log"


def preflight(cfg: Config, mountpoint: str, create_bucket: bool = False) -> None:
    """Check everything a mount needs; raise ``UserError`` with one clear line on the first problem."""
    mp = Path(mountpoint)
    try:
        st = os.stat(mp)
    except FileNotFoundError:
        raise UserError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UserError(
                f"mountpoint {mountpoint} is a dead mount (its daemon is gone): run 'ckptfs umount {mountpoint}' first"
            ) from None
        raise UserError(f"mountpoint {mountpoint} cannot be used: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
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
    if cache.resolve() == mp.resolve() or mp.resolve() in cache.resolve().parents:
        raise UserError("the cache directory must not be inside the mountpoint")
    prepare_cache_dir(cache)
    vfs = os.statvfs(cache)
    disk = vfs.f_blocks * vfs.f_frsize
    if cfg.cache.reserve_mb * MiB >= disk:
        raise UserError(
            f"config: cache.reserve_mb is {cfg.cache.reserve_mb} MiB, but the disk of {cache} holds only"
            f" {disk // MiB} MiB: every write would fail"
        )
    try:
        store = open_store(cfg.store.url, cfg.s3, cfg.upload.concurrency)
        if create_bucket and store.create():
            log.info("created %s", cfg.store.url)
        store.check()
        if cfg.upload.enabled:
            prepare_store(store)
    except BackendError as exc:
        raise UserError(f"store: {exc}") from None


def prepare_cache_dir(cache: Path) -> None:
    """Create the cache directory 0700 (its new parents too, each made durable in its own parent), or
    check an existing one: it holds file contents, so other users may not write it — and read it they
    no longer can. Raises ``UserError`` with one line."""
    if cache.exists() and not cache.is_dir():
        raise UserError(f"cache directory {cache} exists and is not a directory")
    missing: list[Path] = []
    p = cache
    try:
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(mode=0o700)
            fsync_dir(d.parent)  # a power cut must not lose the directory with everything in it
        with tempfile.NamedTemporaryFile(dir=cache, prefix=".probe"):
            pass
    except OSError as exc:
        raise UserError(f"cache directory {cache} is not writable: {exc.strerror or exc}") from None
    mode = stat.S_IMODE(cache.stat().st_mode)
    if mode & 0o022:
        raise UserError(
            f"cache directory {cache} is group- or world-writable (mode {mode:o}); it holds file contents:"
            f" chmod 700 {cache}"
        )
    if mode & 0o077:
        os.chmod(cache, 0o700)  # readable by others (an older ckptfs, a umask): contents stay private now


def lock_cache(cache_dir: str, why: str = "") -> int:
    """Take the cache directory's lock for this process; return its fd (closing it releases the lock).
    Raises ``UserError`` if a daemon has it (``why`` is added to the message)."""
    path = Path(cache_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            pid = read_pid(cache_dir)
            who = f" (pid {pid})" if pid else ""
            raise UserError(f"another ckptfs daemon{who} is already using cache directory {cache_dir}{why}") from None
        raise
    return fd


def cache_in_use(cache_dir: str) -> bool:
    """Does a daemon hold the cache directory's lock? (A daemon that exited holds none, even as a zombie
    its parent has not reaped yet.)"""
    try:
        fd = os.open(Path(cache_dir) / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)


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


def boot_id() -> str:
    """This boot of the machine. ``CKPTFS_BOOT_ID`` overrides it: the power-cut tests use it to say
    "the machine restarted" without restarting it."""
    override = os.environ.get("CKPTFS_BOOT_ID")
    if override:
        return override
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""  # unknown: every start is treated as after a reboot (the safe side)


class _Components:
    """Every long-lived object of one mount, built in dependency order (bottom-up)."""

    def __init__(self, cfg: Config) -> None:
        cache_dir = cfg.cache.dir
        self.health = Health(cache_dir)
        self.db = Database(Path(cache_dir) / DB_NAME)
        self.versions = Versions(self.db)
        # Ingest stops at half the reserve, so namespace operations (unlink to free space!) still fit.
        self.cache = ChunkCache(
            cache_dir,
            min_free=cfg.cache.reserve_mb * MiB // 2,
            direct_io=cfg.cache.direct_io,
            db_path=self.db.path,
        )
        self.cache.sweep_tmp()
        self.workers = Workers.create(cfg.ingest.threads, cfg.ingest.nice, cfg.ingest.idle)
        self.hurry = False  # unmounting: the drain has a deadline, idle cores or not
        self.chunks = ChunkIndex(self.db, self.cache)
        self.reader = ChunkReader(
            self.db,
            self.cache,
            self.workers,
            cfg.cache.decoded_cache_mb * MiB,
            cfg.cache.read_threads,
        )
        self.flat: FlatCopies | None = None
        if cfg.ingest.flat_newest and cfg.ingest.max_chain:
            # (stops at the whole reserve, before ingest at half of it)
            store = ChunkCache(cache_dir, cfg.cache.reserve_mb * MiB, cfg.cache.direct_io, folder="flat")
            store.sweep_tmp()
            self.reader.flat = self.flat = FlatCopies(store)
        elif (Path(cache_dir) / "flat").is_dir():  # switched off: the copies of an earlier mount are waste
            shutil.rmtree(Path(cache_dir) / "flat", ignore_errors=True)
        self.staging = StagingArea(cache_dir)
        healthy = self._healthy
        self.reclaimer = Reclaimer(self.db, self.chunks, self.staging, self.workers, healthy)
        self.marker = DurableMarker(
            self.db,
            self.versions,
            self.chunks,
            self.staging,
            self.reclaimer,
            self.workers,
            cfg.cache.durable_after_s,
            healthy,
        )
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
            newest_keyframe=cfg.ingest.newest_keyframe,
            idle_cores=cfg.ingest.idle_cores,
        )
        self.contents = FileContents(
            self.db,
            self.staging,
            self.chunks,
            self.reader,
            self.workers,
            self.marker,
            self.reclaimer,
            cfg.cache.reserve_mb * MiB,
            self._sealed,
        )
        self.ingester = Ingester(self.contents, self.chunks, self.workers, settings, self.health)
        self.tree = Tree(self.db, self.contents)
        self.evictor = Evictor(
            self.db,
            self.chunks,
            self.cache,
            self.workers,
            cache_cap(cfg),
            cfg.cache.reserve_mb * MiB * 2,
            self.versions.staged_bytes,
            healthy,
            self.flat,
        )
        self.flattener = (
            None
            if self.flat is None
            else Flattener(
                self.db,
                self.cache,
                self.flat,
                self.workers,
                self.ingester.no_idle_core,
                self.evictor.room,
            )
        )
        self.store = open_store(cfg.store.url, cfg.s3, cfg.upload.concurrency)
        self.cache.remote = RemoteFrames(self.db.path, self.store)  # cold reads, and healing corrupt frames
        self.uploader: Uploader | None = None
        self.refresher: Refresher | None = None
        if cfg.upload.enabled:
            writer = Tiering(self.db).writer_id(cfg.node.id)
            if cfg.node.refresh_s:
                self.refresher = Refresher(
                    self.db, self.tree, self.store, writer, cfg.node.refresh_s, _invalidate_entry, healthy
                )
            self.uploader = Uploader(
                self.db,
                self.cache,
                self.store,
                writer,
                concurrency=cfg.upload.concurrency,
                bandwidth=cfg.upload.bandwidth_mb * 1e6,
                interval=cfg.upload.interval_s,
                healthy=healthy,
                compact_wait=cfg.upload.compact_wait_s if cfg.ingest.pco_level else 0.0,
                gc_view=GcView(self.store, cfg.node.gc_view_s),
                nice=cfg.ingest.nice,
            )
        self.idle_backlog = cfg.ingest.idle_backlog_mb * MiB
        self.idle_wait = cfg.ingest.idle_wait_s
        self.workers.urgent = self.encoding_urgent
        self.workers.no_core = self.ingester.others_leave_no_core

    def encoding_urgent(self) -> bool:
        """Encoding stops waiting for idle cores: at unmount, while someone waits for the store
        (``flush``, a remote fsync), when a version has waited ``ingest.idle_wait_s`` (a trainer that
        keeps every core busy must not hold back ``local`` and the upload for good), or when the staged
        backlog passes ``ingest.idle_backlog_mb``."""
        if self.hurry or (self.uploader is not None and self.uploader.waiting):
            return True
        if self.ingester.oldest_wait() > self.idle_wait:
            return True
        return self.versions.staged_bytes() > self.idle_backlog

    def _sealed(self, inode: InodeId, vid: VersionId) -> None:
        self.ingester.submit(inode, vid)

    def _healthy(self) -> bool:
        return not self.health.failsafe


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("received signal %d; unmounting", sig)
            pyfuse3.terminate()
            return


def _recover(c: _Components) -> list[Active]:
    """Before serving: settle what a crash or a power cut left. Returns the staged versions to ingest.

    Every change is made durable before any file it stops referring to is deleted, and the boot id is
    recorded only then: a crash during recovery after a power cut must not be mistaken next time for a
    crash of the daemon alone, which trusts staging files as they are."""
    c.db.checkpoint()  # what a killed daemon committed may still be in the page cache only
    boot = boot_id()
    same_boot = bool(boot) and c.db.get_meta("boot_id") == boot
    recovered, lost, doomed = c.contents.recover(same_boot)
    for line in c.tree.rescue(lost):
        log.warning("recovery: %s (it had no durable version when the power went)", line)
    purged = c.tree.purge_orphans()
    c.chunks.recover_rebases()
    collected = c.chunks.collect()
    c.db.checkpoint()
    for name in doomed:
        c.staging.remove(name)
    for cid in c.chunks.doomed:
        c.cache.delete(cid)
    c.chunks.doomed.clear()
    c.db.set_meta("boot_id", boot)
    if recovered or purged or collected or lost:
        log.info(
            "recovery (%s): %s staged, %s purged, %s collected, %s moved to lost+found",
            "daemon restart" if same_boot else "after a reboot",
            plural(len(recovered), "version"),
            plural(purged, "orphan inode"),
            plural(collected, "chunk"),
            plural(len(lost), "file"),
        )
    return recovered


def _invalidate_entry(parent: InodeId, name: bytes) -> None:
    """Tell the kernel an entry changed behind its back (another node's change)."""
    pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)


def cache_cap(cfg: Config) -> int:
    """``cache.max_gb`` / ``cache.max_percent`` of the cache disk in bytes (the smaller if both; 0: none)."""
    caps = []
    if cfg.cache.max_gb:
        caps.append(int(cfg.cache.max_gb * 1e9))
    if cfg.cache.max_percent:
        st = os.statvfs(cfg.cache.dir)
        caps.append(int(st.f_blocks * st.f_frsize * cfg.cache.max_percent / 100))
    return min(caps) if caps else 0


def _restore(c: _Components) -> None:
    """An empty cache mounted against a store that has a journal (a replacement node): rebuild the
    namespace from the store before serving. Raises ``UserError`` if the store cannot be read."""
    if not Tiering(c.db).is_empty():
        return
    try:
        got = rebuild(c.db, c.store)
    except BackendError as exc:
        raise UserError(f"cannot read the store's journal to recover the namespace: {exc}") from None
    if got is not None:
        log.info(
            "recovered from the store: %s, %s and %s (%s) from %s",
            plural(got.files, "file"),
            plural(got.dirs, "directory"),
            plural(got.others, "other entry"),
            f"{got.bytes / 1e6:.1f} MB",
            plural(got.segments, "journal segment"),
        )


def _status(cfg: Config, c: _Components) -> dict[str, object]:
    """What ``ckptfs status`` shows besides the uploader's own figures."""
    row = c.db.one("SELECT coalesce(sum(stored), 0), count(*) FROM chunks")
    staged = c.db.one("SELECT coalesce(sum(size), 0), count(*) FROM versions WHERE state='staged'")
    vfs = os.statvfs(cfg.cache.dir)
    return {
        "store": cfg.store.url,
        "node": cfg.node.id,
        "failsafe": c.health.describe() if c.health.failsafe else None,
        "cache": {
            "dir": cfg.cache.dir,
            "chunk_bytes": int(row[0]) if row else 0,
            "chunks": int(row[1]) if row else 0,
            "staged_bytes": int(staged[0]) if staged else 0,
            "staged_versions": int(staged[1]) if staged else 0,
            "disk_free_bytes": vfs.f_bavail * vfs.f_frsize,
            "file_bytes": c.cache.file_bytes,
            "cap_bytes": c.evictor.cap or None,
            "evicted_chunks": c.evictor.evicted,
            "evicted_bytes": c.evictor.evicted_bytes,
            "fetched_from_store": c.cache.remote.fetched if c.cache.remote else 0,
            "fetched_bytes": c.cache.remote.fetched_bytes if c.cache.remote else 0,
            "decoded_ahead": c.reader.prefetched,
            "fetched_ahead": c.reader.frames_prefetched,
            "decoded_bytes": c.reader.decoded.size,
            "decoded_peak_bytes": c.reader.decoded.peak,
            "decoded_cap_bytes": c.reader.decoded.capacity,
            "read_requests": c.reader.requests,
            "read_bytes": c.reader.request_bytes,
            "flat_copies": len(c.flat.ids) if c.flat else 0,
            "flat_bytes": c.flat.size if c.flat else 0,
            "flat_reads": c.flat.reads if c.flat else 0,
        },
        "ingest_pending": c.ingester.pending,
        "ingest_oldest_wait_s": round(c.ingester.oldest_wait(), 1),
        # where encoding runs now: "idle cores" (SCHED_IDLE), "nice" (idle off, or urgent: see encoding_urgent)
        "encoding": "idle cores" if c.workers.idle and not c.encoding_urgent() else "nice",
        "others_busy_cores": round(c.ingester.load.others_busy(), 2),
        "refresh": None
        if c.refresher is None
        else {"paths_changed": c.refresher.applied, "last_error": c.refresher.last_error},
        "compaction_pending": int(c.db.one("SELECT count(*) FROM compact_queue")[0]),  # type: ignore[index]
        "flatten_pending": c.flattener.pending if c.flattener else 0,
    }


async def _read_ahead(mountpoint: str, kib: int) -> None:
    """Raise the mount's read-ahead once the kernel's INIT handshake is done (it would cap it again)."""
    problem = await trio.to_thread.run_sync(set_read_ahead, mountpoint, kib)
    if problem:
        log.info("mount.read_ahead_kb = %d not applied (reads go in 128 KiB requests): %s", kib, problem)


def plural(n: int, word: str) -> str:
    """'1 file', '2 files'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


async def _mark_staged(c: _Components) -> None:
    """At a clean stop: give every version still staged its durable mark, so a reboot keeps it."""
    for act in list(c.contents.active.values()):
        if not act.durable and not act.gone:
            try:
                await c.marker.mark(act, foreground=True)
            except OSError as exc:
                log.error("cannot make staged version %d durable at shutdown: %s", act.version, exc)


async def _remind(health: Health) -> None:
    """While in failsafe mode, say so once a minute."""
    while True:
        await trio.sleep(60)
        if health.failsafe:
            log.error("%s; unmount, fix the cause, mount again", health.describe())


async def _serve(cfg: Config, mountpoint: str, c: _Components, ready: Callable[[str | None], None]) -> None:
    previous = c.health.clear_marker()
    if previous:
        log.warning("the previous run of this cache ended in failsafe mode (%s); resuming normally", previous)
    recovered = _recover(c)
    options = set(pyfuse3.default_options)
    options |= {f"fsname=ckptfs:{cfg.cache.dir}", "subtype=ckptfs"}
    if cfg.mount.allow_other and os.geteuid() == 0:
        options.add("allow_other")
    remote_fsync = None
    if c.uploader is not None and cfg.upload.fsync_remote:
        uploader, timeout = c.uploader, cfg.upload.fsync_timeout_s

        async def remote_fsync(paths: list[bytes]) -> None:
            await uploader.wait_paths(paths, timeout)

    kernel = os.uname().release
    direct = cfg.mount.direct_writes and direct_writes_supported(kernel)
    if cfg.mount.direct_writes and not direct:
        log.info("mount.direct_writes off: kernel %s is older than 6.6", kernel)
    pyfuse3.init(Operations(c.tree, cfg.cache.dir, c.health, remote_fsync, direct), mountpoint, options)
    clean = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(c.ingester.run)
            if c.uploader is not None:
                nursery.start_soon(guarded, c.health, "the uploader", c.uploader.run)
            if c.refresher is not None:
                nursery.start_soon(guarded, c.health, "the refresh from other nodes", c.refresher.run)
            nursery.start_soon(guarded, c.health, "the cache evictor", c.evictor.run)
            if c.flattener is not None:
                nursery.start_soon(guarded, c.health, "flat copies of the newest checkpoints", c.flattener.run)
            await nursery.start(c.reader.run)
            control = ControlServer(cfg.cache.dir, c.uploader, lambda: _status(cfg, c), c.db, c.cache)
            await nursery.start(control.run)
            nursery.start_soon(guarded, c.health, "deleting released files", c.reclaimer.run)
            nursery.start_soon(guarded, c.health, "the durable marker", c.marker.run)
            nursery.start_soon(_remind, c.health)
            for act in recovered:
                c.ingester.submit(act.inode, act.version)
                if not act.durable:
                    c.marker.schedule(act)
            nursery.start_soon(_watch_signals)
            if cfg.mount.read_ahead_kb:
                nursery.start_soon(_read_ahead, mountpoint, cfg.mount.read_ahead_kb)
            log.info("mounted %s (cache %s, store %s)", mountpoint, cfg.cache.dir, cfg.store.url)
            ready(None)
            _sd_notify("READY=1")
            await pyfuse3.main()
            clean = True
            _sd_notify("STOPPING=1")
            pyfuse3.close(unmount=True)
            if c.health.failsafe:
                log.error("unmounted %s in failsafe mode (%s); nothing drained", mountpoint, c.health.reason)
            else:
                log.info("unmounted %s; draining %s", mountpoint, plural(c.ingester.pending, "staged version"))
                c.hurry = True
                deadline = trio.current_time() + cfg.mount.drain_seconds
                with trio.move_on_at(deadline):
                    await c.ingester.wait_idle()
                if c.ingester.pending:
                    log.info("%s stay staged; ingested at the next mount", plural(c.ingester.pending, "version"))
                if c.uploader is not None and not await c.uploader.drain(max(0.0, deadline - trio.current_time())):
                    left = c.uploader.tiering.summary().versions
                    log.warning("%s not uploaded yet; uploaded at the next mount", plural(left, "version"))
                await _mark_staged(c)
                await c.reclaimer.wait_idle(timeout=30)
            nursery.cancel_scope.cancel()
    finally:
        if not clean:
            # Keep the mount (it answers ENOTCONN) rather than exposing the plain directory below.
            pyfuse3.close(unmount=False)


def run(cfg: Config, mountpoint: str, ready: Callable[[str | None], None], create_bucket: bool = False) -> int:
    """Mount and serve until unmounted. ``ready(None)`` once mounted, ``ready(message)`` on a pre-flight error."""
    os.umask(0o077)  # every file the daemon creates in the cache (and its log) is private
    try:
        preflight(cfg, mountpoint, create_bucket)
        lock_fd = lock_cache(cfg.cache.dir)
    except UserError as exc:
        ready(str(exc))
        raise
    pid_path = Path(cfg.cache.dir) / PID_NAME
    pid_path.write_text(f"{os.getpid()}\n")
    try:
        c = _Components(cfg)
        try:
            _restore(c)
            trio.run(_serve, cfg, mountpoint, c, ready)
        finally:
            try:
                c.db.checkpoint()
            finally:
                c.db.close()
    except UserError as exc:
        log.error("%s", exc)
        ready(str(exc))
        return 1
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            log.critical("daemon failed: %r", exc, exc_info=True)
        ready(f"daemon failed: {exc!r}")
        return 2
    finally:
        pid_path.unlink(missing_ok=True)
        os.close(lock_fd)
    if c.health.failsafe:
        log.error("daemon exited after failsafe mode: %s", c.health.reason)
        return 3
    log.info("daemon exited cleanly")
    return 0
