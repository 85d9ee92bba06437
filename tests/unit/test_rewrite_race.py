"""A rewrite of a durable staged file races its ingest: ``open_write`` copies the staged version into a
new one (awaiting a worker) while the ingester commits the old one. The commit dropped "every other
version" — the new one too, before it became current — so the file pointed at a version row that no
longer existed: its state read as nothing (ENODATA) and its next commit updated no row. (CI found this
in tests/e2e/test_stress.py.) Committing or marking a version drops only the versions older than it."""

from __future__ import annotations

import os

import trio

from ckptfs import fsck
from ckptfs.files import contents as contents_mod
from ckptfs.files.workers import Workers
from ckptfs.namespace.tree import ROOT
from ckptfs.types import VersionState
from tests.unit.test_commit_points import _create, _first_mount, _read


def test_an_ingest_commit_during_a_rewrites_copy_keeps_the_new_version(tmp_path, monkeypatch):
    c = _first_mount(tmp_path / "cache", monkeypatch)
    v1 = os.urandom(300_000)
    patch = b"rewritten" * 100

    async def scenario() -> tuple[VersionState | None, VersionState | None]:
        await _create(c, b"ck.pt", v1, fsync=True)  # durable and sealed: a rewrite copies it
        ino = c.tree.lookup(ROOT, b"ck.pt").ino
        old = c.versions.current(ino)[0]
        assert old is not None
        real = Workers.run_foreground

        async def ingest_meanwhile(self, fn, *args):  # type: ignore[no-untyped-def]
            if fn is contents_mod._copy_prefix:
                await c.ingester._ingest(ino, old)  # the old staged version commits while it is copied
                assert c.versions.current(ino)[2] is not None
            return await real(self, fn, *args)

        monkeypatch.setattr(Workers, "run_foreground", ingest_meanwhile)
        fh = await c.tree.open(ino, os.O_WRONLY)
        await c.tree.write(fh, 1000, patch)
        c.tree.release(fh)
        monkeypatch.setattr(Workers, "run_foreground", real)
        during = c.tree.state(ino)
        new = c.versions.current(ino)[0]
        assert new is not None and new != old
        await c.ingester._ingest(ino, new)
        return during, c.tree.state(ino)

    during, after = trio.run(scenario)
    assert during == VersionState.STAGED
    assert after == VersionState.LOCAL
    expected = v1[:1000] + patch + v1[1000 + len(patch) :]
    assert _read(c, b"ck.pt") == expected
    ino = c.tree.lookup(ROOT, b"ck.pt").ino
    assert [v.state for v in c.versions.history(ino)] == [VersionState.LOCAL]
    c.db.conn.close()
    report = fsck.check(tmp_path / "cache", verify_data=True)
    assert report.problems == []
