#!/usr/bin/env python3
"""Trainer-visible cost of torch.save into a ckptfs mount vs a plain directory on the same disk.

Saves a ~300 MB model + AdamW state dict (fp32, ~25M parameters) N times into each target,
interleaved (plain, mount, plain, mount, ...), with and without fsync, and as tmp + ``os.replace``
over the previous ``latest.pt``, and times open -> save -> [fsync] -> close [-> rename]. Before each
mount save it waits until the previous version is ingested (a trainer saving every few minutes sees
that steady state) and records close -> ``local`` time, i.e. the ingest pipeline's throughput, and
close -> durable (``local``, or a durable mark). A second mount with ``cache.durable_after_s = 0``
(every closed file fsync'd at once) takes the no-fsync saves too, and a final burst of 3 saves back
to back shows the window when ingest is behind. The bytes each daemon sent to the cache disk
(/proc/PID/io) per byte saved say what a durable mark at close costs.
Prints a table and writes JSON.

    .venv/bin/python scripts/bench_write.py --runs 7 --json bench-write.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import wait_local


def make_state(params_m: float) -> dict:
    torch.manual_seed(0)
    width = 2048
    layers = max(1, round(params_m * 1e6 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 0}


def perturb(state: dict, step: int) -> None:
    """Make each save differ a little, as consecutive checkpoints do."""
    with torch.no_grad():
        for t in state["model"].values():
            t.add_(1e-6)
    state["step"] = step


def timed_save(state: dict, path: Path, fsync: bool) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def wait_durable(path: Path, db: sqlite3.Connection, size: int, timeout: float = 600) -> float:
    """Seconds until ``path`` survives a power cut: committed (state ``local``: the commit is synced) or
    staged with a durable mark of its full size (read from the cache's metadata)."""
    t0 = time.perf_counter()
    ino = os.stat(path).st_ino
    while True:
        if os.getxattr(path, "user.ckptfs.state") != b"staged":
            return time.perf_counter() - t0
        row = db.execute(
            "SELECT v.durable_size FROM inodes i JOIN versions v ON v.id = i.version WHERE i.id=?", (ino,)
        ).fetchone()
        if row is not None and row[0] == size:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{path} not durable after {timeout}s")
        time.sleep(0.005)


def disk_writes(pid: int) -> int:
    """Bytes process ``pid`` has sent (or will send) to storage: written minus cancelled by deletion or
    truncation before write-back (/proc/PID/io)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class Target:
    """A ckptfs mount under test (its own cache), with its daemon's disk-write counter."""

    def __init__(self, work: Path, name: str, durable_after: float) -> None:
        slug = name.replace("@", "-at-")
        self.name, self.mnt, self.cache = name, work / slug, work / f"{slug}-cache"
        self.mnt.mkdir()
        env = {**os.environ, "CKPTFS_CACHE_DURABLE_AFTER_S": str(durable_after)}
        subprocess.run([*CKPTFS, "mount", "--cache", str(self.cache), "--store", f"file://{work}/store-{slug}",
                        str(self.mnt)], check=True, env=env)
        self.pid = int((self.cache / "ckptfs.pid").read_text())
        self.db = sqlite3.connect(f"file:{self.cache / 'meta.db'}?mode=ro", uri=True)
        self.written = disk_writes(self.pid)
        self.last_key: str | None = None
        self.bytes: dict[str, list[int]] = {}  # variant -> [disk bytes, bytes saved]

    def account(self, key: str | None, saved: int) -> None:
        """Charge the disk writes since the last call to the previous save, and start a new one."""
        now = disk_writes(self.pid)
        if self.last_key is not None:
            self.bytes[self.last_key][0] += now - self.written
        self.written, self.last_key = now, key
        if key is not None:
            self.bytes.setdefault(key, [0, 0])[1] += saved

    def umount(self) -> None:
        self.db.close()
        subprocess.run([*CKPTFS, "umount", str(self.mnt)], check=False)


CKPTFS = [sys.executable, "-m", "ckptfs"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--params-m", type=float, default=25.0, help="model parameters in millions (default 25)")
    ap.add_argument("--workdir", default=None, help="directory on the disk to test (default: a temp dir in /var/tmp)")
    ap.add_argument("--json", default=None, help="write results to this file")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ckptfs-bench-", dir=args.workdir or "/var/tmp"))
    plain = work / "plain"
    plain.mkdir()
    results: dict[str, dict[str, list[float]]] = {}
    durable: dict[str, list[float]] = {}
    ingest_mbps: list[float] = []
    disk_bytes: dict[str, float] = {}
    state = make_state(args.params_m)
    size = 0

    def series(m: Target, variants: tuple[str, ...], runs: int, label: str = "") -> None:
        """``runs`` interleaved saves into ``m`` and the plain directory per variant: ``no-fsync``,
        ``fsync``, or ``rename`` (save to a temporary name, then ``os.replace`` it over ``latest.pt``,
        the atomic-save pattern; the time includes the rename)."""
        nonlocal size
        for i in range(runs):
            for key in variants:
                res = results.setdefault(key + label, {"plain": [], m.name: []})
                for target in (("plain", m.name) if i % 2 == 0 else (m.name, "plain")):
                    perturb(state, i)
                    folder = plain if target == "plain" else m.mnt
                    path = folder / f"step_{i:06d}_{key}.pt"
                    if target != "plain":
                        m.account(key, 0)
                    if key == "rename":
                        t0 = time.perf_counter()
                        timed_save(state, folder / "latest.pt.tmp", False)
                        os.replace(folder / "latest.pt.tmp", folder / "latest.pt")
                        res[target].append(time.perf_counter() - t0)
                        path = folder / "latest.pt"
                    else:
                        res[target].append(timed_save(state, path, key == "fsync"))
                    size = path.stat().st_size
                    if target == "plain":
                        if key != "rename":
                            path.unlink()
                        continue
                    m.bytes[key][1] += size
                    d = wait_durable(path, m.db, size)
                    durable.setdefault(f"{m.name} {key}", []).append(d)
                    secs = d + wait_local([path], poll=0.01)  # close -> local
                    if m.name == "ckptfs":
                        ingest_mbps.append(size / 1e6 / max(secs, 1e-3))

    def settle(m: Target) -> None:
        time.sleep(3)  # staging files are deleted once the commits are durable
        m.account(None, 0)
        for key, (w, n) in m.bytes.items():
            disk_bytes[f"{m.name} {key}"] = round(w / max(n, 1), 3)

    # One ckptfs daemon at a time: an idle one compacts (pcodec) while the other is measured.
    m = Target(work, "ckptfs", 2.0)  # the default: an fsync of its own only if not committed 2 s after close
    try:
        series(m, ("no-fsync", "fsync", "rename"), args.runs)
        # back to back, as a trainer saving faster than ingest: each save closes while the last is ingested
        m.account("back-to-back", 0)
        paths = []
        for j in range(3):
            perturb(state, 100 + j)
            p = m.mnt / f"burst_{j}.pt"
            timed_save(state, p, False)
            paths.append(p)
            m.bytes["back-to-back"][1] += p.stat().st_size
            durable.setdefault("ckptfs back-to-back", []).append(wait_durable(p, m.db, p.stat().st_size))
        for p in paths:
            wait_local([p])
        settle(m)
        stats = subprocess.run([*CKPTFS, "stats", "--json", str(m.mnt)], check=True, capture_output=True, text=True)
    finally:
        m.umount()
    mark = Target(work, "mark@close", 0.0)  # every closed file fsync'd at once
    try:
        series(mark, ("no-fsync",), args.runs, " (mark@close)")
        settle(mark)
    finally:
        mark.umount()
        shutil.rmtree(work, ignore_errors=True)

    out = {
        "checkpoint_bytes": size,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "variants": {},
        "ingest_MBps": summary(ingest_mbps),
        "close_to_durable_s": {k: summary(v) for k, v in durable.items()},
        "disk_bytes_per_byte_saved": disk_bytes,
        "ckptfs_stats": json.loads(stats.stdout)["total"],
    }
    print(f"torch.save of a {size / 1e6:.0f} MB model+AdamW state dict, {args.runs} interleaved runs each")
    print(f"{'variant':<10} {'target':<10} {'min s':>7} {'median s':>9} {'max s':>7}")
    for key, res in results.items():
        entry: dict[str, object] = {t: summary(v) for t, v in res.items()}
        for t in res:
            s = summary(res[t])
            print(f"{key:<10} {t:<10} {s['min']:>7.3f} {s['median']:>9.3f} {s['max']:>7.3f}")
        for t in [t for t in res if t != "plain"]:
            pr = summary([m / p for m, p in zip(res[t], res["plain"], strict=True)])
            entry[f"paired_ratio {t}"] = pr
            print(f"{key:<10} {t + '/plain':<10} {pr['min']:>7.2f} {pr['median']:>9.2f} {pr['max']:>7.2f}")
        out["variants"][key] = entry
    im = out["ingest_MBps"]
    print(f"ingest close->local MB/s: min {im['min']:.0f} median {im['median']:.0f} max {im['max']:.0f}")
    print("close -> durable (s):")
    for k, s in out["close_to_durable_s"].items():
        print(f"  {k:<28} min {s['min']:.3f} median {s['median']:.3f} max {s['max']:.3f}")
    print("bytes written to the cache disk per byte saved:")
    for k, v in out["disk_bytes_per_byte_saved"].items():
        print(f"  {k:<28} {v:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
