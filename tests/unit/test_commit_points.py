"""A power cut after any commit: the daemon syncs the WAL from worker threads at any moment, so every
committed state of the metadata may be the one a reboot finds. These tests record the metadata after
each commit of an operation, "reboot" on each (staging files gone: nothing of them was fsync'd) and
check what the durability contract says about it."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ckptfs import config
from ckptfs.daemon import _Components, _recover, prepare_cache_dir
from ckptfs.meta import Database
from ckptfs.namespace.tree import LOST_FOUND, ROOT


class _Recorder:
    """Copies the committed state of the database after every commit while on."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.on = False
        self.snapshots: list[Path] = []

    def take(self, db: Database) -> None:
        if not self.on or db.conn.in_transaction:
            return
        dest = self.root / f"commit-{len(self.snapshots):03d}.db"
        copy = sqlite3.connect(dest)
        db.conn.backup(copy)
        copy.close()
        self.snapshots.append(dest)

    def run(self, operation) -> None:
        """``trio.run(operation)``, recording every commit it makes."""
        self.on = True
        try:
            trio.run(operation)
        finally:
            self.on = False


@pytest.fixture
def recorder(tmp_path, monkeypatch) -> _Recorder:
    rec = _Recorder(tmp_path)
    transaction, execute = Database.transaction, Database.execute

    @contextlib.contextmanager
    def recorded_transaction(self: Database) -> Iterator[sqlite3.Connection]:
        with transaction(self) as c:
            yield c
        rec.take(self)

    def recorded_execute(self: Database, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        cur = execute(self, sql, params)
        if not sql.lstrip().upper().startswith("SELECT"):
            rec.take(self)
        return cur

    monkeypatch.setattr(Database, "transaction", recorded_transaction)
    monkeypatch.setattr(Database, "execute", recorded_execute)
    return rec


def _cfg(cache: Path) -> config.Config:
    prepare_cache_dir(cache)
    return config.load(None, {"cache": {"dir": str(cache)}, "store": {"url": f"file://{cache.parent / 'store'}"}}, {})


def _reboot_on(
    snapshot: Path,
    cache: Path,
    into: Path,
    monkeypatch,
    synced: dict[str, bytes] | None = None,
    unsynced_kept: bool = False,
) -> _Components:
    """A cache directory as a power cut right after ``snapshot``'s commit leaves it: staging files as
    ``synced`` holds them (name -> the bytes fsync'd); every other one gone, or (``unsynced_kept``) as
    the end of the operation left it — the disk wrote it back on its own, the metadata did not follow."""
    shutil.copytree(cache, into, ignore=shutil.ignore_patterns("meta.db*", "*.lock"))
    if not unsynced_kept:
        for staged in (into / "staging").iterdir():
            staged.unlink()
    for name, data in (synced or {}).items():
        (into / "staging" / name).write_bytes(data)
    shutil.copy(snapshot, into / "meta.db")
    monkeypatch.setenv("CKPTFS_BOOT_ID", f"after-{snapshot.stem}")
    c = _Components(_cfg(into))
    _recover(c)
    return c


def _first_mount(cache: Path, monkeypatch) -> _Components:
    """A fresh cache, recovered as the daemon does before serving (boot ``boot-0``)."""
    monkeypatch.setenv("CKPTFS_BOOT_ID", "boot-0")
    c = _Components(_cfg(cache))
    _recover(c)
    return c


async def _create(
    c: _Components, name: bytes, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT, fsync: bool = False
) -> None:
    """create + write ``data`` (if any) + (fsync) + close, through the tree as the FUSE handlers call it."""
    fh, _ = await c.tree.create(ROOT, name, 0o644, flags, os.getuid(), os.getgid())
    if data:
        await c.tree.write(fh, 0, data)
    if fsync:
        await c.tree.fsync(fh)
    c.tree.release(fh)


def _staging(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (cache / "staging").iterdir()}


def _read(c: _Components, name: bytes) -> bytes:
    async def read() -> bytes:
        ino = c.tree.lookup(ROOT, name).ino
        fh = await c.tree.open(ino, os.O_RDONLY)
        try:
            return await c.tree.read(fh, 0, 1 << 20)
        finally:
            c.tree.release(fh)

    return trio.run(read)


def _names(c: _Components, ino) -> set[bytes]:
    return {name for name, _attr, _ in c.tree.readdir(ino, 0)}


@pytest.mark.parametrize("unsynced", ["gone", "kept"])
@pytest.mark.parametrize(
    "flags", [os.O_WRONLY | os.O_CREAT | os.O_TRUNC, os.O_RDWR | os.O_CREAT], ids=["wronly-trunc", "rdwr"]
)
def test_a_new_file_that_never_became_durable_is_never_at_its_path_after_a_power_cut(
    tmp_path, monkeypatch, recorder, flags, unsynced
):
    """create + write + close, no fsync, no durable mark: after a cut at any commit the file is gone
    or in /lost+found — never an empty file at its path that was never a version of it."""
    cache = tmp_path / "cache"
    c = _first_mount(cache, monkeypatch)

    recorder.run(lambda: _create(c, b"new.pt", b"x" * 5000, flags))
    assert len(recorder.snapshots) >= 2  # the creation and the seal at least
    for i, snap in enumerate(recorder.snapshots):
        after = _reboot_on(snap, cache, tmp_path / f"cut-{i}", monkeypatch, unsynced_kept=unsynced == "kept")
        names = _names(after, ROOT)
        assert b"new.pt" not in names, f"a cut after commit {i} left new.pt at its path"
        if LOST_FOUND in names:
            lost = _names(after, after.tree.lookup(ROOT, LOST_FOUND).ino)
            assert all(n.startswith(b"new.pt.") for n in lost), lost
        after.db.conn.close()


def test_a_durable_empty_file_stays_after_a_power_cut(tmp_path, monkeypatch, recorder):
    """The other side: created and closed without a write, the file is durably empty at its seal (there
    are no bytes to lose) — a cut after that commit keeps it at its path."""
    cache = tmp_path / "cache"
    c = _first_mount(cache, monkeypatch)

    recorder.run(lambda: _create(c, b"empty", b""))
    after = _reboot_on(recorder.snapshots[-1], cache, tmp_path / "cut", monkeypatch)
    assert after.tree.lookup(ROOT, b"empty").size == 0
    assert LOST_FOUND not in _names(after, ROOT)


@pytest.mark.parametrize("unsynced", ["gone", "kept"])
@pytest.mark.parametrize("how", ["trunc", "in-place"])
def test_a_rewrite_that_never_became_durable_goes_back_to_the_durable_version(
    tmp_path, monkeypatch, recorder, how, unsynced
):
    """v1 made durable by fsync; then rewritten (O_TRUNC, or in place: a copy, then changed) and closed
    without an fsync: after a cut at any commit of the rewrite the path reads v1, whole."""
    cache = tmp_path / "cache"
    c = _first_mount(cache, monkeypatch)
    v1, v2 = b"one" * 3000, b"two" * 2000

    async def rewrite() -> None:
        ino = c.tree.lookup(ROOT, b"ck.pt").ino
        fh = await c.tree.open(ino, os.O_WRONLY | (os.O_TRUNC if how == "trunc" else 0))
        await c.tree.write(fh, 100, v2)
        c.tree.release(fh)

    trio.run(lambda: _create(c, b"ck.pt", v1, fsync=True))
    synced = _staging(cache)  # v1's staging file, as its fsync left it
    assert list(synced.values()) == [v1]
    recorder.run(rewrite)
    assert len(recorder.snapshots) >= 2
    for i, snap in enumerate(recorder.snapshots):
        after = _reboot_on(snap, cache, tmp_path / f"cut-{i}", monkeypatch, synced, unsynced == "kept")
        assert _read(after, b"ck.pt") == v1, f"a cut after commit {i} of the rewrite"
        assert LOST_FOUND not in _names(after, ROOT)
        after.db.conn.close()


@pytest.mark.parametrize("exchange", [False, True], ids=["replace", "exchange"])
def test_a_file_replaced_by_rename_shows_the_old_or_the_new_content_after_a_power_cut(
    tmp_path, monkeypatch, recorder, exchange
):
    """tmp + rename over a durable file (torch.save to a temporary name, then os.replace), no fsync:
    after a cut at any commit the path reads the old content or the new one, whole — never neither
    (the old inode goes with the rename, so the new one must be durable before the rename is)."""
    cache = tmp_path / "cache"
    c = _first_mount(cache, monkeypatch)
    v1, v2 = b"one" * 3000, b"two" * 2000

    async def replace() -> None:
        await _create(c, b"ck.tmp", v2)
        await c.tree.durable_before_replace(ROOT, b"ck.tmp", ROOT, b"ck.pt", exchange)  # as fuse.ops does
        c.tree.rename(ROOT, b"ck.tmp", ROOT, b"ck.pt", noreplace=False, exchange=exchange)

    trio.run(lambda: _create(c, b"ck.pt", v1, fsync=True))
    recorder.run(replace)
    synced = _staging(cache)  # what the fsyncs left: v1, and v2 once the rename made it durable
    seen = set()
    for i, snap in enumerate(recorder.snapshots):
        after = _reboot_on(snap, cache, tmp_path / f"cut-{i}", monkeypatch, synced)
        assert b"ck.pt" in _names(after, ROOT), f"a cut after commit {i} left no ck.pt"
        got = _read(after, b"ck.pt")
        assert got in (v1, v2), f"a cut after commit {i}"
        seen.add(got)
        after.db.conn.close()
    assert seen == {v1, v2}  # the last commits are the rename's
