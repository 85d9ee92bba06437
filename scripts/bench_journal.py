#!/usr/bin/env python3
"""Reading the namespace from the bucket: every journal segment, vs a journal snapshot (what ``ckptfs gc``
leaves after compacting), on SeaweedFS on loopback, side by side in one run.

A training job saves a checkpoint every interval and keeps the newest ``--keep``: each save publishes one
segment (the new file's event and the tombstone of the one that fell out). The events are made at the
size real ones have: a ~300 MB torch.save file in 4 MiB pieces is ~75 chunks, each with its delta base,
so ~150 chunk entries (object, offset, length, base, depth, codec).

For each series length N (``--segments``): the time a new node takes to read the namespace
(``tier.recover.read_journal``: list, get every segment, merge) with every segment there, and after two
gc cycles (a snapshot, the segments it covers deleted); the requests and bytes that costs; and the
requests of one refresh pass (the journal's list pages). Prints a table (min / median / max of
``--runs``) and writes JSON.

    .venv/bin/python scripts/bench_journal.py --segments 500 2000 --runs 5 --json bench-journal.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ckptfs.backend.base import ObjectInfo  # noqa: E402
from ckptfs.backend.s3 import S3Settings, S3Store  # noqa: E402
from ckptfs.tier.gc import collect  # noqa: E402
from ckptfs.tier.layout import encode_segment, segment_key  # noqa: E402
from ckptfs.tier.recover import read_journal  # noqa: E402
from tests.s3server import ACCESS_KEY, SECRET_KEY, running_server  # noqa: E402


class Counting:
    """An object store that counts requests and bytes (list pages: 1000 keys each, as S3 returns)."""

    def __init__(self, inner: S3Store) -> None:
        self.inner = inner
        self.gets = self.pages = self.bytes = 0

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(key, offset, length)
        self.gets += 1
        self.bytes += len(data)
        return data

    def list(self, prefix: str) -> Iterator[str]:
        keys = list(self.inner.list(prefix))
        self.pages += max(1, -(-len(keys) // 1000))
        yield from keys

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        infos = list(self.inner.list_info(prefix))
        self.pages += max(1, -(-len(infos) // 1000))
        yield from infos

    def __getattr__(self, name: str):  # put, delete, head, ...
        return getattr(self.inner, name)


def file_event(path: str, rnd: bytes) -> dict:
    chunks = {}
    extents = []
    packs = [f"packs/{rnd[:1].hex()}/{rnd.hex()}{i:04x}" for i in range(10)]
    for i in range(75):
        cid, base = os.urandom(16).hex(), os.urandom(16).hex()
        extents.append([i * 4194304, 4194304, cid])
        chunks[cid] = [packs[i % 10], i * 1400000, 1400000, base, 1, 4194304, 5]
        chunks[base] = [packs[(i + 3) % 10], i * 2800000, 2800000, None, 0, 4194304, 5]
    return {"path": path, "kind": "file", "mode": 0o100644, "uid": 0, "gid": 0, "mtime": time.time_ns(),
            "size": 75 * 4194304, "extents": extents, "chunks": chunks}


def fill(store: S3Store, n: int, keep: int) -> int:
    """``n`` segments of a series keeping the newest ``keep``; returns the bytes put."""
    def one(i: int) -> int:
        events = [file_event(f"/run7/step_{i * 10:08d}.pt", os.urandom(16))]
        if i >= keep:
            events.append({"path": f"/run7/step_{(i - keep) * 10:08d}.pt", "kind": "gone"})
        ts = 1_700_000_000_000_000_000 + i * 600_000_000_000  # a save every 10 minutes
        sid = os.urandom(6).hex()
        data = encode_segment("node-a.0123456789abcdef", ts, events, sid)
        store.put(segment_key("node-a.0123456789abcdef", ts, sid), data)
        return len(data)

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(one, range(n)))


def measure(store: S3Store, runs: int, keep: int) -> dict:
    times, gets, pages, nbytes = [], 0, 0, 0
    for _ in range(runs):
        c = Counting(store)
        t0 = time.perf_counter()
        view = read_journal(c)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
        live = sum(1 for _, ev in view.winners.values() if ev["kind"] != "gone")
        assert live == keep, live
        gets, pages, nbytes = c.gets, c.pages, c.bytes
    refresh = Counting(store)
    list(refresh.list("journal/"))
    return {"seconds": times, "gets": gets, "list_pages": pages, "bytes": nbytes, "refresh_pages": refresh.pages}


def stats(xs: list[float]) -> str:
    return f"{min(xs):.3f} / {statistics.median(xs):.3f} / {max(xs):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--keep", type=int, default=5)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.getLogger("ckptfs.tier.gc").setLevel(logging.CRITICAL)  # (the made-up events name no real pack)
    work = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=os.environ.get("BENCH_DIR")))
    server = running_server(work / "weed")
    results: dict = {"keep": args.keep, "runs": args.runs, "series": []}
    try:
        for n in args.segments:
            bucket = f"journal-{n}"
            server.client().create_bucket(Bucket=bucket)
            store = S3Store(S3Settings(bucket=bucket, prefix="", endpoint=server.endpoint, region="us-east-1",
                                       access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY))
            put = fill(store, n, args.keep)
            every = measure(store, args.runs, args.keep)
            t0 = time.perf_counter()
            collect(store, 1.0)  # a snapshot covering every segment
            time.sleep(2.2)  # the first snapshot is a grace old, the tombstones two
            collect(store, 1.0)  # the next one; the segments the first covers are deleted
            gc_s = time.perf_counter() - t0 - 2.2
            snap = measure(store, args.runs, args.keep)
            results["series"].append({"segments": n, "bytes_put": put, "journal": every, "snapshot": snap,
                                      "two_gc_cycles_s": gc_s})
    finally:
        server.stop()
    print(f"\nnamespace read by a new node (read_journal), SeaweedFS on loopback, keep {args.keep}, "
          f"{args.runs} runs, seconds min / median / max")
    print(f"{'segments':>9} | {'every segment':>24} | {'snapshot + rest':>24} | ratio | GETs | LIST pages/refresh")
    for r in results["series"]:
        a, b = r["journal"], r["snapshot"]
        ratio = statistics.median(a["seconds"]) / statistics.median(b["seconds"])
        print(f"{r['segments']:>9} | {stats(a['seconds']):>24} | {stats(b['seconds']):>24} | {ratio:4.0f}× |"
              f" {a['gets']} vs {b['gets']} | {a['refresh_pages']} vs {b['refresh_pages']}")
        print(f"{'':>9}   bytes read {a['bytes'] / 1e6:.1f} MB vs {b['bytes'] / 1e6:.2f} MB;"
              f" two gc cycles {r['two_gc_cycles_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
