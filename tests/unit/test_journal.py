"""The bucket's pure formats: packs, journal segments, the format marker, and the journal merge — which
must give the same namespace whatever order segments are listed or fetched in."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptfs.tier.journal import merge, winners
from ckptfs.tier.layout import (
    build_pack,
    check_marker,
    decode_segment,
    encode_segment,
    marker,
    path_bytes,
    path_text,
    read_pack_index,
)
from ckptfs.types import ChunkId

paths = st.sampled_from(["/a", "/a/b", "/c", "/run/x.pt", "/run/y.pt"])
events = st.builds(
    lambda p, kind, size: {"path": p, "kind": kind, "size": size},
    paths,
    st.sampled_from(["file", "dir", "gone", "symlink"]),
    st.integers(0, 10),
)
segments = st.lists(
    st.builds(
        lambda ts, writer, sid, evs: {"ts": ts, "writer": writer, "id": sid, "events": evs},
        st.integers(1, 5),  # few distinct times: ties between writers and within a segment happen
        st.sampled_from(["node-a.01", "node-b.02", "node-c.03"]),
        st.text("0123456789abcdef", min_size=12, max_size=12),
        st.lists(events, max_size=6),
    ),
    max_size=8,
    unique_by=lambda seg: (seg["ts"], seg["writer"], seg["id"]),  # (a segment's identity)
)


@settings(max_examples=300)
@given(segments, st.randoms())
def test_merge_does_not_depend_on_the_order_of_segments(segs, rnd):
    shuffled = list(segs)
    rnd.shuffle(shuffled)
    assert merge(segs) == merge(shuffled)
    assert winners(segs) == winners(shuffled)


def test_the_latest_event_wins_and_a_tombstone_removes():
    segs = [
        {"ts": 1, "writer": "a", "events": [{"path": "/x", "kind": "file", "size": 1}, {"path": "/y", "kind": "dir"}]},
        {"ts": 2, "writer": "b", "events": [{"path": "/x", "kind": "gone"}]},
        {"ts": 2, "writer": "a", "events": [{"path": "/y", "kind": "file", "size": 2}]},
        {"ts": 3, "writer": "a", "events": [{"path": "/x", "kind": "file", "size": 3}, {"path": "/x", "kind": "gone"}]},
    ]
    got = merge(segs)
    assert set(got) == {"/y"}  # /x: the later event of the same segment wins, and it is a tombstone
    assert got["/y"]["size"] == 2
    assert winners(segs)["/x"][0] == (3, "a", "", 1)


def test_pack_round_trip_and_names():
    frames = [(ChunkId(bytes([i]) * 16), bytes(random.Random(i).randbytes(100 + i))) for i in range(20)]
    pack = build_pack(frames)
    index = read_pack_index(pack.data)
    assert [(c, o, n) for c, _, o, n in index] == [(c, *pack.offsets[c]) for c, _ in frames]
    for cid, frame in frames:
        off, n = pack.offsets[cid]
        assert pack.data[off : off + n] == frame
    again = build_pack(frames)
    assert again.data == pack.data and again.key != pack.key  # the same bytes put up again: a new name
    name = pack.key.split("/")
    assert name[0] == "packs" and name[1] == name[2][:2] and len(name[2]) == 32


def test_segments_marker_and_paths():
    seg = encode_segment("n.1", 5, [{"path": "/a", "kind": "dir"}])
    assert decode_segment(seg)["events"] == [{"path": "/a", "kind": "dir"}]
    for bad in (b"", b"not zstd", encode_segment("n.1", 5, [])[:-3]):
        try:
            decode_segment(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} decoded")
    assert check_marker(marker()) is None
    assert "format 9" in (check_marker(b'{"format": 9}') or "")
    assert check_marker(b"junk") is not None
    weird = b"/r\xffun/\xc3\xa9.pt"  # not UTF-8: survives the JSON text form
    assert path_bytes(path_text(weird)) == weird
