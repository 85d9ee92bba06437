"""Remote garbage collection (``tier.gc``) on an in-memory store with a clock the test moves: what is
marked, when it is swept, what revives a mark, what stops a cycle, and the writers' view of it."""

from __future__ import annotations

import time

import pytest

from ckptfs.backend import MemoryStore
from ckptfs.errors import PermanentBackendError, UserError
from ckptfs.tier.gc import collect, newest_record
from ckptfs.tier.gcview import GcView
from ckptfs.tier.layout import build_pack, encode_segment, segment_key
from ckptfs.types import ChunkId

G = 100.0  # grace, seconds


class Clock:
    """Time as the gc and the store see it: the real clock plus what the test added."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += int(seconds * 1e9)


def _pack(store, *names: bytes):
    pack = build_pack([(ChunkId(n.ljust(16, b"\0")), n * 100) for n in names])
    store.put(pack.key, pack.data)
    return pack


def _publish(store, path: str, pack, *names: bytes, seq=[0]) -> None:  # noqa: B006 (a counter)
    """A journal segment whose event for ``path`` names the frames ``names`` of ``pack``."""
    chunks = {}
    for n in names:
        cid = ChunkId(n.ljust(16, b"\0"))
        off, length = pack.offsets[cid]
        chunks[cid.hex()] = [pack.key, off, length, None, 0, length, 1]
    ev = {"path": path, "kind": "file", "mode": 0o100644, "uid": 0, "gid": 0, "mtime": 0, "size": 1,
          "extents": [[0, 1, c] for c in chunks], "chunks": chunks}
    seq[0] += 1
    ts = time.time_ns() + seq[0]
    store.put(segment_key("w", ts, f"{seq[0]:04d}"), encode_segment("w", ts, [ev], f"{seq[0]:04d}"))


def _gone(store, path: str, seq=[10_000]) -> None:  # noqa: B006
    seq[0] += 1
    ts = time.time_ns() + seq[0]
    store.put(segment_key("w", ts, f"{seq[0]:05d}"), encode_segment("w", ts, [{"path": path, "kind": "gone"}]))


def test_a_dead_pack_is_marked_then_swept_a_grace_later_and_live_or_young_ones_stay():
    clock = Clock()
    store = MemoryStore(clock)
    live, dead = _pack(store, b"a"), _pack(store, b"b")
    _publish(store, "/live", live, b"a")
    _publish(store, "/old", dead, b"b")
    _gone(store, "/old")
    r = collect(store, G, now_ns=clock)
    assert (r.marked_now, r.young_packs, r.swept) == (0, 1, 0)  # too young to judge
    clock.advance(G + 1)
    young = _pack(store, b"c")  # put just now: never a candidate, whatever names it
    r = collect(store, G, now_ns=clock)
    assert (r.live_packs, r.marked_now, r.marked, r.swept, r.young_packs) == (1, 1, 1, 0, 1)
    assert set(store.list("packs/")) == {live.key, dead.key, young.key}  # a mark deletes nothing
    _, rec = newest_record(store)
    assert rec is not None and set(rec.marked) == {dead.key}
    clock.advance(G / 2)
    r = collect(store, G, now_ns=clock)
    assert r.swept == 0 and r.marked == 1  # not a grace since the mark yet
    clock.advance(G / 2 + 1)
    r = collect(store, G, now_ns=clock)
    assert r.swept == 1 and r.swept_keys == [dead.key]
    assert dead.key not in set(store.list("packs/")) and live.key in set(store.list("packs/"))
    keys, rec = newest_record(store)
    assert len(keys) == 1 and rec is not None and dead.key in rec.swept  # superseded records are gone
    assert young.key in rec.marked  # it got old meanwhile, and nothing names it


def test_a_marked_pack_that_a_new_segment_names_is_revived():
    clock = Clock()
    store = MemoryStore(clock)
    p = _pack(store, b"a", b"b")
    _publish(store, "/x", p, b"a")
    _gone(store, "/x")
    clock.advance(G + 1)
    assert collect(store, G, now_ns=clock).marked_now == 1
    _publish(store, "/y", p, b"b")  # a writer whose view predates the mark dedups onto it
    clock.advance(G + 1)
    r = collect(store, G, now_ns=clock)
    assert (r.revived, r.swept, r.marked) == (1, 0, 0)
    assert p.key in set(store.list("packs/"))
    _, rec = newest_record(store)
    assert rec is not None and p.key not in rec.marked


def test_a_pack_put_again_after_its_mark_is_not_swept():
    clock = Clock()
    store = MemoryStore(clock)
    p = _pack(store, b"a")
    clock.advance(G + 1)
    collect(store, G, now_ns=clock)
    store.put(p.key, store.get(p.key))  # (pack names are random: only a foreign tool could do this)
    clock.advance(G + 1)
    r = collect(store, G, now_ns=clock)
    assert r.swept == 0 and p.key in set(store.list("packs/"))


def test_partly_dead_packs_are_reported_and_kept():
    clock = Clock()
    store = MemoryStore(clock)
    p = _pack(store, b"a", b"b", b"c")
    _publish(store, "/x", p, b"a")
    clock.advance(G + 1)
    r = collect(store, G, now_ns=clock)
    assert (r.live_packs, r.partly_dead_packs, r.marked_now) == (1, 1, 0)
    assert r.dead_bytes_in_live_packs == 200  # frames b and c, 100 bytes each
    clock.advance(G + 1)
    assert collect(store, G, now_ns=clock).swept == 0 and p.key in set(store.list("packs/"))


def test_an_unreadable_journal_segment_stops_the_cycle_before_anything_changes():
    clock = Clock()
    store = MemoryStore(clock)
    _pack(store, b"a")
    clock.advance(G + 1)
    collect(store, G, now_ns=clock)
    store.put("journal/w/00000000000000000001-bad", b"not zstd")
    before = {k: store.get(k) for k in store.list("")}
    clock.advance(G + 1)
    with pytest.raises(UserError, match="journal segment .* is unreadable"):
        collect(store, G, now_ns=clock)
    assert {k: store.get(k) for k in store.list("")} == before


def test_a_dry_run_changes_nothing():
    clock = Clock()
    store = MemoryStore(clock)
    _pack(store, b"a")
    clock.advance(G + 1)
    r = collect(store, G, now_ns=clock, dry_run=True)
    assert r.marked_now == 1 and r.record is None and list(store.list("gc/")) == []


def test_an_unreadable_gc_record_stops_gc_and_writers():
    store = MemoryStore()
    store.put("gc/00000000000000000001-x", b"{")
    with pytest.raises(UserError, match="gc record .* is unreadable"):
        collect(store, G)
    with pytest.raises(PermanentBackendError, match="gc record"):
        GcView(store, 60).refresh()


def test_the_writers_view_holds_marked_and_swept_names_and_ages_by_the_grace():
    clock = Clock()
    store = MemoryStore(clock)
    a, b = _pack(store, b"a"), _pack(store, b"b")
    view = GcView(store, max_age_s=3600)
    assert view.stale() and view.refresh() is False and view.dead == frozenset()
    assert view.age_limit() == 3600 and not view.stale()
    clock.advance(G + 1)
    collect(store, G, now_ns=clock)
    assert view.refresh() is True and view.dead == {a.key, b.key}
    assert view.age_limit() == G / 2  # the record's grace bounds the view's age
    clock.advance(G + 1)
    collect(store, G, now_ns=clock)  # both swept
    assert view.refresh() is False and view.dead == {a.key, b.key}
    assert list(store.list("packs/")) == []


def test_the_cli_refuses_a_grace_writers_could_outlive_and_a_bad_duration(tmp_path, capsys):
    from ckptfs.cli.main import main

    url = f"file://{tmp_path / 'objects'}"
    assert main(["gc", "--store", url, "--grace", "10m"]) != 0  # node.gc_view_s is 600 s by default
    assert "less than twice node.gc_view_s" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gc", "--store", url, "--grace", "soon"])
    assert "not a duration" in capsys.readouterr().err
    assert main(["gc", "--store", url, "--grace", "20m", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["packs"] == 0 and report["record"].startswith("gc/")


def test_a_sweep_interrupted_after_its_record_is_finished_by_the_next_cycle(monkeypatch):
    clock = Clock()
    store = MemoryStore(clock)
    p = _pack(store, b"a")
    clock.advance(G + 1)
    collect(store, G, now_ns=clock)
    clock.advance(G + 1)
    monkeypatch.setattr(store, "delete", lambda key: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        collect(store, G, now_ns=clock)  # the record naming the sweep is written, the delete is not
    monkeypatch.undo()
    assert p.key in set(store.list("packs/"))
    _, rec = newest_record(store)
    assert rec is not None and p.key in rec.swept
    collect(store, G, now_ns=clock)
    assert p.key not in set(store.list("packs/"))


# -- journal compaction -------------------------------------------------------------------------------


def test_compaction_keeps_the_namespace_whatever_it_deletes():
    """Random writes, deletes and gc cycles: what a new node reads (the newest snapshot and the segments
    left) is always the merge of every segment ever written, while old segments go."""
    import random

    from ckptfs.tier import journal
    from ckptfs.tier.layout import decode_segment
    from ckptfs.tier.recover import read_journal

    rnd = random.Random(7)
    clock = Clock()
    store = MemoryStore(clock)
    ever: dict[str, dict] = {}  # every segment written, by key
    deleted = 0
    for step in range(40):
        for _ in range(rnd.randint(1, 3)):
            path = f"/d{rnd.randint(0, 2)}/f{rnd.randint(0, 4)}"
            if rnd.random() < 0.3:
                _gone(store, path)
            else:
                name = bytes([65 + step % 26])
                _publish(store, path, _pack(store, name), name)
        ever.update({k: decode_segment(store.get(k)) for k in store.list("journal/") if k not in ever})
        if step % 5 == 4:
            deleted += collect(store, G, now_ns=clock).segments_deleted
        clock.advance(G / 4)
        got = {p: ev for p, (_, ev) in read_journal(store, strict=True).winners.items() if ev["kind"] != "gone"}
        assert got == journal.merge(ever.values()), step
    assert deleted > 0 and len(list(store.list("journal/"))) < len(ever)
    assert len(list(store.list("snapshots/"))) == 2  # the newest and the one before it


def test_an_unreadable_newest_snapshot_falls_back_to_the_one_before_and_stops_gc():
    from ckptfs.tier import journal
    from ckptfs.tier.layout import decode_segment
    from ckptfs.tier.recover import read_journal

    clock = Clock()
    store = MemoryStore(clock)
    ever: dict[str, dict] = {}
    for step in range(3):
        p = _pack(store, bytes([70 + step]))
        _publish(store, f"/f{step}", p, bytes([70 + step]))
        ever.update({k: decode_segment(store.get(k)) for k in store.list("journal/") if k not in ever})
        collect(store, G, now_ns=clock)
        clock.advance(G + 1)
    assert len(list(store.list("journal/"))) < len(ever)  # the first file's segment is only in snapshots
    newest = sorted(store.list("snapshots/"))[-1]
    store.put(newest, b"garbage")
    got = {p: ev for p, (_, ev) in read_journal(store).winners.items() if ev["kind"] != "gone"}
    assert got == journal.merge(ever.values()) and len(got) == 3
    with pytest.raises(UserError, match="journal snapshot .* is unreadable"):
        collect(store, G, now_ns=clock)
