#!/usr/bin/env python3
"""Trainer-visible cost of torch.save into a ckptfs mount vs a plain directory on the same disk.

Saves a ~300 MB model + AdamW state dict (fp32, ~25M parameters) N times into each target,
interleaved (plain, mount, plain, mount, ...), with and without fsync, and times open -> save ->
[fsync] -> close. Before each mount save it waits until the previous version is ingested (a trainer
saving every few minutes sees that steady state) and records close -> ``local`` time, i.e. the
ingest pipeline's throughput. Prints a table and writes JSON.

    .venv/bin/python scripts/bench_write.py --runs 7 --json bench-write.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


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


def wait_local(path: Path, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while os.getxattr(path, "user.ckptfs.state") == b"staged":
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{path} not ingested after {timeout}s")
        time.sleep(0.01)
    return time.perf_counter() - t0


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--params-m", type=float, default=25.0, help="model parameters in millions (default 25)")
    ap.add_argument("--workdir", default=None, help="directory on the disk to test (default: a temp dir in /var/tmp)")
    ap.add_argument("--json", default=None, help="write results to this file")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ckptfs-bench-", dir=args.workdir or "/var/tmp"))
    plain, mnt, cache = work / "plain", work / "mnt", work / "cache"
    for d in (plain, mnt):
        d.mkdir()
    ckptfs = [sys.executable, "-m", "ckptfs"]
    subprocess.run([*ckptfs, "mount", "--cache", str(cache), "--store", f"file://{work}/store", str(mnt)], check=True)
    results: dict[str, dict[str, list[float]]] = {}
    ingest_mbps: list[float] = []
    try:
        state = make_state(args.params_m)
        size = 0
        for i in range(args.runs):
            for fsync in (False, True):
                key = "fsync" if fsync else "no-fsync"
                res = results.setdefault(key, {"plain": [], "ckptfs": []})
                order = ("plain", "ckptfs") if i % 2 == 0 else ("ckptfs", "plain")
                for target in order:
                    perturb(state, i)
                    name = f"step_{i:06d}_{key}.pt"
                    path = (plain if target == "plain" else mnt) / name
                    res[target].append(timed_save(state, path, fsync))
                    size = path.stat().st_size
                    if target == "ckptfs":
                        ingest_mbps.append(size / 1e6 / wait_local(path))
                    else:
                        path.unlink()
        stats = subprocess.run([*ckptfs, "stats", "--json", str(mnt)], check=True, capture_output=True, text=True)
    finally:
        subprocess.run([*ckptfs, "umount", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    out = {
        "checkpoint_bytes": size,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "variants": {},
        "ingest_MBps": summary(ingest_mbps),
        "ckptfs_stats": json.loads(stats.stdout)["total"],
    }
    print(f"torch.save of a {size / 1e6:.0f} MB model+AdamW state dict, {args.runs} interleaved runs each")
    print(f"{'variant':<10} {'target':<8} {'min s':>7} {'median s':>9} {'max s':>7}")
    for key, res in results.items():
        entry = {t: summary(v) for t, v in res.items()}
        ratios = [m / p for m, p in zip(res["ckptfs"], res["plain"], strict=True)]
        entry["ratio_of_medians"] = entry["ckptfs"]["median"] / entry["plain"]["median"]
        entry["paired_ratio"] = summary(ratios)
        out["variants"][key] = entry
        for t in ("plain", "ckptfs"):
            s = entry[t]
            print(f"{key:<10} {t:<8} {s['min']:>7.3f} {s['median']:>9.3f} {s['max']:>7.3f}")
        pr = entry["paired_ratio"]
        print(f"{key:<10} {'ratio':<8} {pr['min']:>7.2f} {pr['median']:>9.2f} {pr['max']:>7.2f}"
              f"   (ratio of medians {entry['ratio_of_medians']:.2f})")
    im = out["ingest_MBps"]
    print(f"ingest close->local MB/s: min {im['min']:.0f} median {im['median']:.0f} max {im['max']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
