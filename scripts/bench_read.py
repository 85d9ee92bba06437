#!/usr/bin/env python3
"""Restore speed: torch.load from a ckptfs mount vs from a plain directory on the same disk, side by side.

A ~300 MB fp32 model + AdamW state (25M parameters) is trained on the CPU and saved every 10 optimizer
steps, 9 times, into both (the same bytes). Once the daemon is idle (ingested, compacted; the default
store is a local directory), the newest and the oldest version are loaded, alternating plain / mount:

  warm          the file was just read (page cache hot; the daemon's decoded-chunk cache too)
  drop_caches   after ``echo 3 > /proc/sys/vm/drop_caches`` (the daemon keeps its process memory)
  remount       after an unmount + mount and drop_caches (nothing decoded anywhere)

For each: seconds (min / median / max of --runs), the ratio of medians, MB/s, the daemon's CPU seconds
per GB read, and the FUSE read requests per file. Needs root (drop_caches). Prints a table, writes JSON.

    .venv/bin/python scripts/bench_read.py --runs 5 --json bench-read.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import cpu_seconds, drop_caches, fmt, mmm, mount, trainer, umount, wait_idle

from ckptfs import control, daemon


def load(path: Path) -> float:
    t0 = time.perf_counter()
    torch.load(path, map_location="cpu")
    return time.perf_counter() - t0


def reader_counts(cache: Path) -> tuple[int, int]:
    st = control.request(str(cache), {"op": "status"})["cache"]
    return int(st["read_requests"]), int(st["read_bytes"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--versions", type=int, default=9)
    ap.add_argument("--params-m", type=float, default=25.0)
    ap.add_argument("--steps-apart", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_read: needs root (drop_caches)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="bench-read-", dir=os.environ.get("BENCH_DIR")))
    env = {**os.environ, "CKPTFS_NODE_ID": "bench"}
    cache, mnt, plain = work / "cache", work / "mnt", work / "plain"
    store = f"file://{work / 'objects'}"
    plain.mkdir()
    mount(env, cache, mnt, store)
    steps = trainer(args.params_m)
    names = []
    try:
        for v in range(args.versions):
            state = steps(args.steps_apart)
            name = f"step_{(v + 1) * args.steps_apart:06d}.pt"
            torch.save(state, plain / name)
            shutil.copyfile(plain / name, mnt / name)
            names.append(name)
            wait_idle(cache)  # a trainer saving minutes apart: each save ingested before the next
        size = (plain / names[-1]).stat().st_size
        results: dict = {"runs": args.runs, "versions": args.versions, "file_bytes": size, "cases": []}
        for target in (names[-1], names[0]):
            assert (plain / target).read_bytes() == (mnt / target).read_bytes()
            for mode in ("warm", "drop_caches", "remount"):
                t_plain, t_mnt, cpu, reqs = [], [], [], []
                for run in range(args.runs):
                    order = ("plain", "mnt") if run % 2 == 0 else ("mnt", "plain")
                    for side in order:
                        if mode == "warm":
                            (plain if side == "plain" else mnt).joinpath(target).read_bytes()
                        elif mode == "remount" and side == "mnt":
                            umount(env, mnt)
                            mount(env, cache, mnt, store)
                        if mode != "warm":
                            drop_caches()
                        if side == "plain":
                            t_plain.append(load(plain / target))
                            continue
                        pid = daemon.read_pid(str(cache))
                        assert pid is not None
                        c0, (r0, _) = cpu_seconds(pid), reader_counts(cache)
                        t_mnt.append(load(mnt / target))
                        cpu.append((cpu_seconds(pid) - c0) / (size / 1e9))
                        reqs.append(reader_counts(cache)[0] - r0)
                case = {
                    "file": target,
                    "version": "newest" if target == names[-1] else "oldest",
                    "mode": mode,
                    "plain_s": mmm(t_plain),
                    "ckptfs_s": mmm(t_mnt),
                    "ratio": statistics.median(t_mnt) / statistics.median(t_plain),
                    "ckptfs_mb_s": size / 1e6 / statistics.median(t_mnt),
                    "plain_mb_s": size / 1e6 / statistics.median(t_plain),
                    "daemon_cpu_s_per_gb": mmm(cpu),
                    "read_requests": mmm([float(r) for r in reqs]),
                }
                results["cases"].append(case)
                print(f"{case['version']:>6} {mode:>11}: plain {fmt(case['plain_s'])} s, ckptfs"
                      f" {fmt(case['ckptfs_s'])} s, {case['ratio']:.2f}×", flush=True)
    finally:
        try:
            umount(env, mnt)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\ntorch.load of a {size / 1e6:.0f} MB fp32 model + AdamW checkpoint ({args.versions} versions,"
          f" {args.steps_apart} steps apart), {args.runs} runs, seconds min / median / max")
    print(f"{'version':>7} {'mode':>11} | {'plain dir':>23} | {'ckptfs':>23} | ratio | ckptfs MB/s |"
          f" daemon CPU s/GB | FUSE reads")
    for c in results["cases"]:
        print(f"{c['version']:>7} {c['mode']:>11} | {fmt(c['plain_s']):>23} | {fmt(c['ckptfs_s']):>23} |"
              f" {c['ratio']:4.2f}× | {c['ckptfs_mb_s']:11.0f} | {c['daemon_cpu_s_per_gb']['median']:15.2f} |"
              f" {c['read_requests']['median']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
