"""``ckptfs`` — one console script with subcommands: mount, umount, stats, fsck."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ckptfs import __version__, config, control, daemon, fsck, stats
from ckptfs import log as logsetup
from ckptfs.cli.mounts import ckptfs_mounts, mount_of
from ckptfs.daemon import plural
from ckptfs.errors import UserError
from ckptfs.health import MARKER_NAME

log = logging.getLogger(__name__)
T = TypeVar("T")


def _config(args: argparse.Namespace) -> config.Config:
    overrides: dict[str, dict[str, object]] = {}
    if getattr(args, "cache", None):
        overrides.setdefault("cache", {})["dir"] = os.path.abspath(args.cache)
    if getattr(args, "store", None):
        overrides.setdefault("store", {})["url"] = args.store
    return config.load(args.config, overrides)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# -- mount / umount ----------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    cfg = _config(args)
    mountpoint = os.path.abspath(args.mountpoint)
    level = logging.DEBUG if args.debug else logging.INFO
    if args.foreground:
        logsetup.setup(level, None if args.ready_fd is None else str(Path(cfg.cache.dir) / daemon.LOG_NAME))
        ready_fd = args.ready_fd

        def ready(error: str | None) -> None:
            nonlocal ready_fd
            if ready_fd is None:
                return
            try:
                os.write(ready_fd, b"OK\n" if error is None else f"ERR {error}\n".encode())
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = None

        return daemon.run(cfg, mountpoint, ready, create_bucket=args.create_bucket)
    # Background: check in this process for quick, clear errors, then start the daemon and wait for it.
    os.umask(0o077)  # the log and everything else in the cache directory are private
    daemon.preflight(cfg, mountpoint, create_bucket=args.create_bucket)
    os.close(daemon.lock_cache(cfg.cache.dir))  # raises if a daemon holds the cache; a stale pid file is fine
    rfd, wfd = os.pipe()
    # -P and cwd=/: a folder named "ckptfs" in the current directory must not shadow the package
    cmd = [sys.executable, "-P", "-m", "ckptfs", "mount", "--foreground", "--ready-fd", str(wfd), mountpoint]
    cmd += ["--cache", cfg.cache.dir, "--store", cfg.store.url]
    if args.config:
        cmd += ["--config", os.path.abspath(args.config)]
    if args.debug:
        cmd.append("--debug")
    with open(Path(cfg.cache.dir) / daemon.LOG_NAME, "ab") as logf:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(wfd,),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            cwd="/",
        )
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        line = r.readline().decode().strip()
    if line == "OK":
        print(f"ckptfs mounted at {mountpoint} (pid {proc.pid}, cache {cfg.cache.dir}, store {cfg.store.url})")
        return 0
    proc.wait(timeout=30)
    msg = line[4:] if line.startswith("ERR ") else f"daemon exited with status {proc.returncode}"
    raise UserError(f"mount failed: {msg} (log: {Path(cfg.cache.dir) / daemon.LOG_NAME})")


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    found = mount_of(mountpoint)
    if found is None or found[1] != "":
        raise UserError(f"{mountpoint} is not a ckptfs mount point")
    cache_dir = found[0].cache_dir
    pid = daemon.read_pid(cache_dir)
    tool = "fusermount3" if os.geteuid() != 0 else "umount"
    res = subprocess.run([tool, mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"cannot unmount {mountpoint}: {res.stderr.strip() or res.stdout.strip()}")
    # The daemon is gone when it has let go of the cache lock (a pid test would count a zombie as alive).
    deadline = time.monotonic() + args.timeout
    while daemon.cache_in_use(cache_dir):
        if time.monotonic() > deadline:
            who = f"daemon pid {pid}" if pid else "its daemon"
            raise UserError(f"unmounted {mountpoint}, but {who} is still running after {args.timeout:.0f} s")
        time.sleep(0.1)
    print(f"unmounted {mountpoint}")
    return 0


# -- stats / fsck ------------------------------------------------------------------------------


def _cache_for(args: argparse.Namespace) -> tuple[str, str]:
    """(cache directory, path relative to the mount root) that ``args`` name: a path inside a mount, else
    ``--cache``, else the mount the current directory is in, else the configured cache."""
    if not args.path and not args.cache:
        here = mount_of(os.getcwd())
        if here is not None:
            return here[0].cache_dir, here[1]
    if args.path:
        found = mount_of(args.path)
        if found is not None:
            return found[0].cache_dir, found[1]
        if not args.cache:
            raise UserError(
                f"{args.path} is not inside a ckptfs mount (give --cache DIR and a path relative to the root)"
            )
    return _config(args).cache.dir, (args.path or "") if args.cache else ""


def _query(args: argparse.Namespace, fn: Callable[[sqlite3.Connection, str], T]) -> T:
    """Run a read-only query against the metadata of the mount (or ``--cache``) that ``args.path`` names."""
    cache_dir, rel = _cache_for(args)
    db = Path(cache_dir) / daemon.DB_NAME
    if not db.exists():
        raise UserError(f"no ckptfs metadata in {cache_dir}")
    conn = stats.open_readonly(db)
    try:
        return fn(conn, rel)
    except FileNotFoundError:
        raise UserError(f"{rel} does not exist in the filesystem") from None
    finally:
        conn.close()


def _health_note(cache_dir: str) -> str | None:
    """What the daemon of ``cache_dir`` says about failsafe mode, or its last run's marker; None if fine."""
    for m in ckptfs_mounts():
        if os.path.realpath(m.cache_dir) == os.path.realpath(cache_dir):
            try:
                return f"the daemon is in {os.getxattr(m.mountpoint, 'user.ckptfs.failsafe').decode()}"
            except OSError:
                return None
    try:
        marker = (Path(cache_dir) / MARKER_NAME).read_text().strip()
    except OSError:
        return None
    return f"the last run of this cache ended in failsafe mode ({marker})"


def cmd_stats(args: argparse.Namespace) -> int:
    note = _health_note(_cache_for(args)[0])
    if note:
        print(f"ckptfs: WARNING: {note}", file=sys.stderr)
    total, per_dir = _query(args, stats.usage)
    if args.json:
        print(json.dumps({"total": total.as_dict(), "dirs": {k: v.as_dict() for k, v in sorted(per_dir.items())}}))
        return 0
    cols = [("files", 6), ("logical", 10), ("stored", 10), ("staged", 10), ("-dedup", 10), ("-delta", 10)]
    cols += [("-compr", 10), ("ratio", 7)]
    print(f"{'directory':<36} " + " ".join(f"{name:>{width}}" for name, width in cols))

    def row(name: str, u: stats.Usage) -> None:
        print(
            f"{name[-36:]:<36} {u.files:>6} {_human(u.logical):>10} {_human(u.stored_total):>10}"
            f" {_human(u.staged):>10} {_human(u.saved_by_dedup):>10} {_human(u.saved_by_delta):>10}"
            f" {_human(u.saved_by_compression):>10} {u.ratio:>6.2f}x"
        )

    for name, u in sorted(per_dir.items()):
        if u.files:
            row(name, u)
    row("TOTAL", total)
    if total.base_only:
        print(f"(stored includes {_human(total.base_only)} of chunks kept only as delta bases of other files)")
    print("-dedup/-delta/-compr: bytes saved by deduplication, by delta coding, by compression")
    return 0


def cmd_ls_versions(args: argparse.Namespace) -> int:
    rows = _query(args, stats.versions)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
        return 0
    print(f"{'path':<44} {'version':>7} {'state':<7} {'size':>10} {'stored':>10} {'base':<30} codecs")
    for r in rows:
        base = "-" if not r.base_version else f"v{r.base_version} {r.base_path or '(deleted)'}"
        codecs = " ".join(f"{k}:{v}" for k, v in sorted(r.codecs.items()))
        print(
            f"{r.path[-44:]:<44} {str(r.version):>7} {r.state:<7} {_human(r.size):>10}"
            f" {_human(r.stored):>10} {base[-30:]:<30} {codecs}"
        )
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    cache_dir = _config(args).cache.dir
    why = "; fsck --repair needs the daemon stopped: ckptfs umount its mountpoint first"
    lock_fd = daemon.lock_cache(cache_dir, why) if args.repair else None
    try:
        rep = fsck.check(cache_dir, verify_data=args.verify_data, repair=args.repair)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    note = _health_note(cache_dir)
    if note:
        rep.warnings.insert(0, note)
    for line in rep.repaired:
        print(f"repaired: {line}")
    for line in rep.warnings:
        print(f"warning: {line}")
    for line in rep.problems:
        print(f"PROBLEM: {line}")
    print(
        f"fsck: {plural(rep.checked_files, 'file')}, {plural(rep.checked_chunks, 'chunk')} checked"
        f"{f' ({rep.remote_only} only in the store)' if rep.remote_only else ''}, "
        f"{plural(len(rep.problems), 'problem')}, {plural(len(rep.warnings), 'warning')}"
    )
    return 0 if rep.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    cache_dir, _ = _cache_for(args)
    st = control.request(cache_dir, {"op": "status"})
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    up, cache = st.get("upload"), st["cache"]
    print(f"store      {st['store']} (node {st['node']})")
    if st.get("failsafe"):
        print(f"FAILSAFE   {st['failsafe']}")
    print(
        f"cache      {_human(cache['chunk_bytes'])} in {cache['chunks']} chunks, {_human(cache['staged_bytes'])}"
        f" staged in {plural(cache['staged_versions'], 'version')}; {_human(cache['disk_free_bytes'])} free"
    )
    waited = f", the oldest for {st['ingest_oldest_wait_s']:.0f} s" if st["ingest_pending"] else ""
    print(
        f"ingest     {plural(st['ingest_pending'], 'version')} waiting{waited}; encoding on {st['encoding']}"
        f" (other processes keep {st['others_busy_cores']:.1f} cores busy);"
        f" {plural(st['compaction_pending'], 'chunk')} to compact"
    )
    print(
        f"reads      {cache['flat_copies']} flat copies of the newest chunks ({_human(cache['flat_bytes'])},"
        f" {st['flatten_pending']} to make or drop); {cache['flat_reads']} chunk reads served by them"
    )
    if up is None:
        print("upload     disabled (upload.enabled = false)")
        return 0
    oldest = "" if up["oldest_pending_s"] is None else f", oldest queued {up['oldest_pending_s']:.1f} s ago"
    print(f"upload     {plural(up['queued_versions'], 'version')} queued ({_human(up['queued_bytes'])}){oldest}")
    print(
        f"           {_human(up['rate_bytes_per_s'])}/s over the last minute; {_human(up['bytes_sent'])} in"
        f" {plural(up['objects_sent'], 'object')} sent,"
        f" {plural(up['journal_segments'], 'journal segment')}"
    )
    if up["last_error"]:
        print(f"last error {up['last_error']} ({up['last_error_age_s']:.0f} s ago)")
    for f in up["failing"]:
        print(f"failing    {f['path'] or '(unlinked)'}: {f['attempts']} attempts: {f['error']}")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    cache_dir, rel = _cache_for(args)
    timeout = args.timeout if args.wait else 0.0
    reply = control.request(cache_dir, {"op": "flush", "path": rel, "timeout": timeout}, timeout=timeout + 30)
    if "error" in reply:
        raise UserError(reply["error"])
    missing = reply["missing"]
    if not missing:
        if args.wait:
            print(f"everything under {args.path or '/'} is in the store")
        return 0
    what = "not in the store yet" if args.wait else "being uploaded"
    print(f"{plural(len(missing), 'path')} {what}:", file=sys.stderr if args.wait else sys.stdout)
    for path in missing[:20]:
        print(f"  {path}", file=sys.stderr if args.wait else sys.stdout)
    if len(missing) > 20:
        print(f"  ... and {len(missing) - 20} more", file=sys.stderr if args.wait else sys.stdout)
    return 2 if args.wait else 0


class _Bar:
    """A one-line progress bar on stderr (a terminal), or nothing."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, done: float, total: float, unit: str = "") -> None:
        now = time.monotonic()
        if not self.tty or (now - self._last < 0.1 and done < total):
            return
        self._last = now
        width = 30
        filled = int(width * done / total) if total else width
        print(
            f"\r{self.what} [{'#' * filled}{'.' * (width - filled)}] {done:.0f}/{total:.0f}{unit}",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def end(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def cmd_recover(args: argparse.Namespace) -> int:
    from ckptfs.backend import open_store
    from ckptfs.errors import BackendError
    from ckptfs.meta import Database
    from ckptfs.tier import prepare_store
    from ckptfs.tier.recover import rebuild

    cfg = _config(args)
    cache = Path(cfg.cache.dir)
    daemon.prepare_cache_dir(cache)
    fd = daemon.lock_cache(cfg.cache.dir)  # no daemon may use the cache meanwhile
    try:
        store = open_store(cfg.store.url, cfg.s3, cfg.upload.concurrency)
        try:
            store.check()
            prepare_store(store)
        except BackendError as exc:
            raise UserError(f"store: {exc}") from None
        db = Database(cache / daemon.DB_NAME)
        bar = _Bar("reading the journal")
        try:
            got = rebuild(db, store, progress=lambda d, t: bar(d, t, " segments"))
        except BackendError as exc:
            raise UserError(f"recover: the store failed: {exc}") from None
        finally:
            bar.end()
            db.checkpoint()
            db.close()
    finally:
        os.close(fd)
    if got is None:
        print(f"recover: {cfg.store.url} holds no journal: nothing to recover")
        return 0
    print(
        f"recovered {plural(got.files, 'file')} ({_human(got.bytes)}), {plural(got.dirs, 'directory')} and"
        f" {plural(got.others, 'other entry')} from {plural(got.segments, 'journal segment')} into {cfg.cache.dir}"
    )
    return 0


def _duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``6h`` or ``2d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 6h)") from None


def cmd_gc(args: argparse.Namespace) -> int:
    """One cycle of remote garbage collection (tier.gc): mark, sweep what was marked a grace ago, revive."""
    from ckptfs.backend import open_store
    from ckptfs.errors import BackendError
    from ckptfs.tier import prepare_store
    from ckptfs.tier.gc import collect

    cfg = _config(args)
    if args.grace < 2 * cfg.node.gc_view_s:
        raise UserError(
            f"gc: --grace {args.grace:.0f} s is less than twice node.gc_view_s ({cfg.node.gc_view_s:.0f} s): a"
            " writer could still name what this would delete"
        )
    store = open_store(cfg.store.url, cfg.s3, cfg.upload.concurrency)
    bar = _Bar("reading the journal")
    try:
        store.check()
        prepare_store(store)
        report = collect(store, args.grace, dry_run=args.dry_run, progress=lambda d, t: bar(d, t, " segments"))
    except BackendError as exc:
        raise UserError(f"gc: the store failed: {exc}") from None
    finally:
        bar.end()
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
        return 0
    what = "would sweep" if args.dry_run else "swept"
    print(
        f"gc: {plural(report.packs, 'pack')} ({_human(report.pack_bytes)}),"
        f" {plural(report.segments, 'journal segment')}: {report.live_packs} live"
        f" ({report.partly_dead_packs} partly dead, {_human(report.dead_bytes_in_live_packs)} not named),"
        f" {report.young_packs} too young to judge"
    )
    print(
        f"gc: {what} {plural(report.swept, 'pack')} ({_human(report.swept_bytes)}); marked {report.marked}"
        f" ({_human(report.marked_bytes)}, {report.marked_now} new); revived {report.revived}"
    )
    if report.snapshot is not None:
        print(
            f"gc: journal snapshot {report.snapshot} written; {plural(report.segments_deleted, 'segment')} it or an"
            " earlier one covers deleted"
        )
    if report.next_sweep_ns is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.next_sweep_ns / 1e9))
        print(f"gc: the marked ones may be swept by a gc run after {when}")
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    """Ask each mount's daemon to fetch the files' frames from the store into its cache."""
    by_cache: dict[str, list[str]] = {}
    for path in args.paths:
        found = mount_of(path)
        if found is None:
            raise UserError(f"{path} is not inside a ckptfs mount")
        by_cache.setdefault(found[0].cache_dir, []).append(found[1])
    failed = False
    for cache_dir, rels in by_cache.items():
        bar = _Bar("warmup")
        reply = control.request(
            cache_dir,
            {"op": "warmup", "paths": rels, "jobs": args.jobs},
            timeout=None,
            progress=lambda m, bar=bar: bar(m["progress"][2] / 1e6, m["progress"][3] / 1e6, " MB"),  # type: ignore[misc]
        )
        bar.end()
        if "error" in reply:
            raise UserError(reply["error"])
        secs = max(float(reply["seconds"]), 1e-9)
        fetched = int(reply["fetched_bytes"])
        print(
            f"warmup: {plural(int(reply['files']), 'file')}, {_human(fetched)} fetched from the store in"
            f" {secs:.1f} s ({fetched / 1e6 / secs:.0f} MB/s)"
        )
        for line in reply["errors"]:
            print(f"ckptfs: {line}", file=sys.stderr)
        failed |= not reply["ok"]
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptfs", description="A FUSE filesystem for ML checkpoints.")
    p.add_argument("--version", action="version", version=f"ckptfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="TOML config file (default /etc/ckptfs/ckptfs.toml if present)")
        sp.add_argument("--cache", help="cache directory (staging, chunks, metadata)")

    m = sub.add_parser("mount", help="mount ckptfs (daemonizes once mounted unless --foreground)")
    common(m)
    m.add_argument("--store", help="object store URL: file:///var/lib/ckptfs/objects, s3://bucket/prefix")
    m.add_argument("--create-bucket", action="store_true", help="create the store's bucket if it does not exist")
    m.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground, log to stderr")
    m.add_argument("--debug", action="store_true", help="debug logging")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("mountpoint")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount and wait for the daemon to exit")
    u.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the daemon (default 600)")
    u.add_argument("mountpoint")
    u.set_defaults(func=cmd_umount)

    s = sub.add_parser("stats", help="logical vs stored bytes, dedup and compression ratios per directory")
    common(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("path", nargs="?", help="a path inside a mount (default: the whole filesystem)")
    s.set_defaults(func=cmd_stats)

    lv = sub.add_parser("ls-versions", help="each file's version: state, layout, delta base, codec mix")
    common(lv)
    lv.add_argument("--json", action="store_true", help="machine-readable output")
    lv.add_argument("path", nargs="?", help="a file or directory inside a mount (default: everything)")
    lv.set_defaults(func=cmd_ls_versions)

    st = sub.add_parser("status", help="upload queue, upload rate, cache use and the last error of a mount")
    common(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("path", nargs="?", help="a mountpoint or a path inside it (default: the current directory's)")
    st.set_defaults(func=cmd_status)

    fl = sub.add_parser("flush", help="upload everything under PATH now; with --wait, return once it is in the store")
    common(fl)
    fl.add_argument("--wait", action="store_true", help="wait until everything under PATH is in the store")
    fl.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits at most (default 600; exit 2)")
    fl.add_argument("path", nargs="?", help="a file or directory inside a mount (default: the current directory's)")
    fl.set_defaults(func=cmd_flush)

    rc = sub.add_parser("recover", help="rebuild an empty cache's namespace from the store (daemon stopped)")
    common(rc)
    rc.add_argument("--store", help="object store URL (default: store.url of the config)")
    rc.set_defaults(func=cmd_recover)

    g = sub.add_parser("gc", help="delete packs no file needs any more from the store (mark, then sweep later)")
    g.add_argument("--config", help="TOML config file (default /etc/ckptfs/ckptfs.toml if present)")
    g.add_argument("--store", help="object store URL (default: store.url of the config)")
    g.add_argument(
        "--grace", type=_duration, default=6 * 3600.0, help="how long a pack stays marked before a sweep (default 6h)"
    )
    g.add_argument("--dry-run", action="store_true", help="report what would be marked and swept; change nothing")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=cmd_gc)

    w = sub.add_parser("warmup", help="fetch files (their chunks) from the store into the local cache")
    w.add_argument("--jobs", "-j", type=int, default=8, help="objects fetched at once (default 8)")
    w.add_argument("paths", nargs="+", help="files or directories inside a mount")
    w.set_defaults(func=cmd_warmup)

    f = sub.add_parser("fsck", help="check metadata and chunks; exit 1 on a problem")
    common(f)
    f.add_argument("--verify-data", action="store_true", help="decode every chunk and verify its hash")
    f.add_argument("--repair", action="store_true", help="remove orphan chunk files (daemon must be stopped)")
    f.set_defaults(func=cmd_fsck)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"ckptfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
