#!/usr/bin/env python3
"""Tiering to S3 (SeaweedFS on loopback, started here), side by side with plain boto3, in one run.

A ~300 MB fp32 model + AdamW state (25M parameters) is trained on the CPU and saved every 10
optimizer steps, N times. For each save:

  (a) torch.save blocking time into the mount vs into a plain directory on the same disk, and vs a
      second mount with tiering off (``upload.enabled = false``): what tiering itself adds;
  (b) close -> remote-durable (``user.ckptfs.state`` = remote; every other save with a ``ckptfs flush``
      right after close, which does not wait for compaction) vs a plain boto3 ``upload_file`` of the
      same bytes (multipart, 10 threads: boto3's defaults);
  (e) S3 requests the daemon sent for the file (its own count, retries included).

Then, on a new node each time (an empty cache mounted against the bucket: recovery, then a cold read):

  (c) cold torch.load of the newest checkpoint vs boto3 ``download_fileobj`` + torch.load of it; and
      the same load after ``ckptfs warmup`` and the flat copies the recovered slot index asks for;
  (d) ``ckptfs warmup`` of the whole series, MB/s, vs boto3 downloads of the same files.

Also the bucket bytes of each side. Prints a table (min / median / max) and writes JSON.

    .venv/bin/python scripts/bench_tier.py --saves 7 --cold-runs 3 --json bench-tier.json

Each save starts from a clean page cache (``os.sync``), the order alternates, and the next save waits
until the daemon is idle (nothing to ingest, compact or upload), as a trainer saving minutes apart sees.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import cli, fmt, mmm, mount, trainer, umount, wait_idle  # noqa: E402

from ckptfs import control  # noqa: E402
from tests.s3server import running_server  # noqa: E402


def timed_save(state: dict, path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
    return time.perf_counter() - t0


def wait_remote(path: Path, timeout: float = 900) -> float:
    t0 = time.perf_counter()
    while os.getxattr(path, "user.ckptfs.state") != b"remote":
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{path} not remote after {timeout} s")
        time.sleep(0.01)
    return time.perf_counter() - t0


def requests_sent(cache: Path) -> int:
    return int(control.request(str(cache), {"op": "status"})["upload"]["requests"])


def bucket_bytes(client, bucket: str) -> int:
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--saves", type=int, default=6)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--params-m", type=float, default=25.0)
    ap.add_argument("--steps-apart", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()

    from boto3.s3.transfer import TransferConfig

    work = Path(tempfile.mkdtemp(prefix="bench-tier-", dir=os.environ.get("BENCH_DIR")))
    server = running_server(work / "weed")
    client = server.client()
    client.create_bucket(Bucket="ckpt")
    client.create_bucket(Bucket="plain")
    env = {**os.environ, **server.env(), "CKPTFS_NODE_ID": "bench"}
    store = "s3://ckpt/run"
    plain = work / "plain"
    plain.mkdir()
    mnt = work / "mnt"
    untiered = work / "mnt-untiered"
    results: dict = {"params_m": args.params_m, "steps_apart": args.steps_apart, "saves": []}
    steps = trainer(args.params_m)
    xfer = TransferConfig()  # boto3's defaults: multipart above 8 MB, 10 threads
    try:
        cache_a = work / "cache-a"
        mount(env, cache_a, mnt, store)
        (mnt / "run7").mkdir()
        env_off = {**env, "CKPTFS_UPLOAD_ENABLED": "false"}
        cache_u = work / "cache-untiered"
        mount(env_off, cache_u, untiered, f"file://{work / 'untiered-store'}")
        for i in range(args.saves):
            state = steps(args.steps_apart)
            name = f"step_{(i + 1) * args.steps_apart:06d}.pt"
            # Each save starts from a clean page cache (os.sync: no write-back of the other one throttles
            # it); plain first on odd saves, the mount first on even ones.
            hurry = i % 2 == 1  # every other save: `ckptfs flush` right after close (no compaction wait)
            if i % 2:
                os.sync()
                t_plain = timed_save(state, plain / name)
            os.sync()
            before = requests_sent(cache_a)
            t_mount = timed_save(state, mnt / "run7" / name)
            if hurry:
                t0 = time.perf_counter()
                reply = control.request(str(cache_a), {"op": "flush", "path": f"run7/{name}", "timeout": 900})
                assert reply["ok"], reply
                t_remote = time.perf_counter() - t0
            else:
                t_remote = wait_remote(mnt / "run7" / name)
            requests = requests_sent(cache_a) - before
            wait_idle(cache_a)  # steady state: the next save finds the daemon idle, as minutes later
            os.sync()
            t_untiered = timed_save(state, untiered / name)
            wait_idle(cache_u)
            if not i % 2:
                os.sync()
                t_plain = timed_save(state, plain / name)
            os.sync()
            t0 = time.perf_counter()
            client.upload_file(str(plain / name), "plain", name, Config=xfer)
            t_boto = time.perf_counter() - t0
            size = (plain / name).stat().st_size
            row = {
                "file": name,
                "bytes": size,
                "save_plain_s": t_plain,
                "save_mount_s": t_mount,
                "save_untiered_s": t_untiered,
                "close_to_remote_s": t_remote,
                "boto3_upload_s": t_boto,
                "requests": requests,
                "flush": hurry,
            }
            results["saves"].append(row)
            print(
                f"  {name}: save {t_plain:.2f} / {t_mount:.2f} s (untiered mount {t_untiered:.2f} s),"
                f" remote ({'flush' if hurry else 'default'})"
                f" after {t_remote:.2f} s"
                f" (boto3 upload {t_boto:.2f} s), {requests} requests",
                flush=True,
            )
        cli(env, "flush", "--wait", str(mnt))
        umount(env, mnt)
        umount(env, untiered)
        newest = results["saves"][-1]["file"]
        results["bucket_bytes_ckptfs"] = bucket_bytes(client, "ckpt")
        results["bucket_bytes_plain"] = bucket_bytes(client, "plain")

        cold = []
        for r in range(args.cold_runs):
            cache = work / f"cache-cold-{r}"
            t0 = time.perf_counter()
            mount(env, cache, mnt, store)
            t_recover = time.perf_counter() - t0
            before = requests_sent(cache)
            t0 = time.perf_counter()
            torch.load(mnt / "run7" / newest)
            t_load = time.perf_counter() - t0
            load_requests = requests_sent(cache) - before
            umount(env, mnt)
            shutil.rmtree(cache)
            t0 = time.perf_counter()
            buf = io.BytesIO()
            client.download_fileobj("plain", newest, buf, Config=xfer)
            buf.seek(0)
            torch.load(buf)
            t_boto = time.perf_counter() - t0
            cold.append(
                {
                    "mount_and_recover_s": t_recover,
                    "cold_load_s": t_load,
                    "boto3_load_s": t_boto,
                    "load_requests": load_requests,
                }
            )
            print(
                f"  cold load {t_load:.2f} s (boto3 + load {t_boto:.2f} s), mount+recover {t_recover:.2f} s,"
                f" {load_requests} requests",
                flush=True,
            )
        results["cold"] = cold

        warm = []
        total = sum(s["bytes"] for s in results["saves"])
        for r in range(args.cold_runs):
            cache = work / f"cache-warm-{r}"
            mount(env, cache, mnt, store)
            t0 = time.perf_counter()
            cli(env, "warmup", str(mnt / "run7"))
            t_warm = time.perf_counter() - t0
            # the recovered slot index names the newest's deltas: its flat copies are made in idle time
            t0 = time.perf_counter()
            st = wait_idle(cache)
            t_flat = time.perf_counter() - t0
            os.sync()  # the copies and the warmed frames written back: the load does not share the disk with that
            t0 = time.perf_counter()
            torch.load(mnt / "run7" / newest)
            t_load = time.perf_counter() - t0
            umount(env, mnt)
            shutil.rmtree(cache)
            t0 = time.perf_counter()
            for s in results["saves"]:
                client.download_fileobj("plain", s["file"], io.BytesIO(), Config=xfer)
            t_boto = time.perf_counter() - t0
            warm.append(
                {
                    "warmup_mb_s": total / 1e6 / t_warm,
                    "boto3_mb_s": total / 1e6 / t_boto,
                    "flat_wait_s": t_flat,
                    "flat_copies": st["cache"]["flat_copies"],
                    "load_after_warmup_s": t_load,
                }
            )
            print(
                f"  warmup {total / 1e6 / t_warm:.0f} MB/s (boto3 downloads {total / 1e6 / t_boto:.0f} MB/s),"
                f" then {st['cache']['flat_copies']} flat copies in {t_flat:.2f} s, torch.load {t_load:.2f} s",
                flush=True,
            )
        results["warmup"] = warm
    finally:
        for m in (mnt, untiered):
            if os.path.ismount(m):
                subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)
        server.stop()

    saves = results["saves"][1:] or results["saves"]  # the first save has no base: a keyframe
    summary = {
        "a_save_ratio": mmm([s["save_mount_s"] / s["save_plain_s"] for s in saves]),
        "a_save_plain_s": mmm([s["save_plain_s"] for s in saves]),
        "a_save_mount_s": mmm([s["save_mount_s"] for s in saves]),
        "a_save_untiered_s": mmm([s["save_untiered_s"] for s in saves]),
        "a_tiering_ratio": mmm([s["save_mount_s"] / s["save_untiered_s"] for s in saves]),
        "b_remote_ratio": mmm([s["close_to_remote_s"] / s["boto3_upload_s"] for s in saves if not s["flush"]]),
        "b_close_to_remote_s": mmm([s["close_to_remote_s"] for s in saves if not s["flush"]]),
        "b_boto3_upload_s": mmm([s["boto3_upload_s"] for s in saves if not s["flush"]]),
        "b_flush_ratio": mmm([s["close_to_remote_s"] / s["boto3_upload_s"] for s in saves if s["flush"]]),
        "b_flush_s": mmm([s["close_to_remote_s"] for s in saves if s["flush"]]),
        "b_flush_boto3_upload_s": mmm([s["boto3_upload_s"] for s in saves if s["flush"]]),
        "c_cold_ratio": mmm([c["cold_load_s"] / c["boto3_load_s"] for c in results["cold"]]),
        "c_cold_load_s": mmm([c["cold_load_s"] for c in results["cold"]]),
        "c_boto3_load_s": mmm([c["boto3_load_s"] for c in results["cold"]]),
        "c_mount_and_recover_s": mmm([c["mount_and_recover_s"] for c in results["cold"]]),
        "c_after_warmup_load_s": mmm([w["load_after_warmup_s"] for w in results["warmup"]]),
        "c_after_warmup_ratio": mmm(
            [
                w["load_after_warmup_s"] / c["boto3_load_s"]
                for w, c in zip(results["warmup"], results["cold"], strict=True)
            ]
        ),
        "c_flat_wait_s": mmm([w["flat_wait_s"] for w in results["warmup"]]),
        "d_warmup_mb_s": mmm([w["warmup_mb_s"] for w in results["warmup"]]),
        "d_boto3_mb_s": mmm([w["boto3_mb_s"] for w in results["warmup"]]),
        "e_requests_per_file": mmm([float(s["requests"]) for s in saves]),
        "e_requests_cold_load": mmm([float(c["load_requests"]) for c in results["cold"]]),
        "first_save": results["saves"][0],
    }
    results["summary"] = summary
    mb = results["saves"][0]["bytes"] / 1e6
    print(
        f"\n{args.saves} saves of {mb:.0f} MB, {args.steps_apart} optimizer steps apart; SeaweedFS on loopback;"
        " min / median / max (saves after the first)"
    )
    print("| measure | ckptfs | plain | ratio |")
    print("|---|---|---|---|")
    print(
        f"| (a) torch.save blocking (s) | {fmt(summary['a_save_mount_s'])} | {fmt(summary['a_save_plain_s'])}"
        f" | {fmt(summary['a_save_ratio'], 2)} |"
    )
    print(
        f"| (a) torch.save blocking, tiered vs untiered mount (s) | {fmt(summary['a_save_mount_s'])}"
        f" | {fmt(summary['a_save_untiered_s'])} | {fmt(summary['a_tiering_ratio'], 2)} |"
    )
    print(
        f"| (b) close → remote-durable, default (waits for compaction) vs boto3 upload_file (s) |"
        f" {fmt(summary['b_close_to_remote_s'])} | {fmt(summary['b_boto3_upload_s'])}"
        f" | {fmt(summary['b_remote_ratio'], 2)} |"
    )
    print(
        f"| (b) close → `ckptfs flush` returns vs boto3 upload_file (s) | {fmt(summary['b_flush_s'])} |"
        f" {fmt(summary['b_flush_boto3_upload_s'])} | {fmt(summary['b_flush_ratio'], 2)} |"
    )
    print(
        f"| (c) cold torch.load, empty cache vs boto3 download + load (s) | {fmt(summary['c_cold_load_s'])} |"
        f" {fmt(summary['c_boto3_load_s'])} | {fmt(summary['c_cold_ratio'], 2)} |"
    )
    print(
        f"| (c) torch.load on a new node after `warmup` and its flat copies vs boto3 download + load (s) |"
        f" {fmt(summary['c_after_warmup_load_s'])} | {fmt(summary['c_boto3_load_s'])}"
        f" | {fmt(summary['c_after_warmup_ratio'], 2)} |"
    )
    print(f"| (c) flat copies made after `warmup` returned (s) | {fmt(summary['c_flat_wait_s'])} | | |")
    print(
        f"| (d) warmup of the series (MB/s) | {fmt(summary['d_warmup_mb_s'], 0)} | {fmt(summary['d_boto3_mb_s'], 0)}"
        " | |"
    )
    print(f"| (e) S3 requests per checkpoint file | {fmt(summary['e_requests_per_file'], 0)} | | |")
    print(f"| S3 requests of one cold load | {fmt(summary['e_requests_cold_load'], 0)} | | |")
    print(f"| mount + recovery of an empty cache (s) | {fmt(summary['c_mount_and_recover_s'])} | | |")
    print(
        f"| bucket bytes | {results['bucket_bytes_ckptfs'] / 1e6:.0f} MB | {results['bucket_bytes_plain'] / 1e6:.0f} MB"
        f" | {results['bucket_bytes_ckptfs'] / results['bucket_bytes_plain']:.3f} |"
    )
    fs = results["saves"][0]
    print(
        f"first save (keyframe): remote after {fs['close_to_remote_s']:.2f} s vs boto3 {fs['boto3_upload_s']:.2f} s,"
        f" {fs['requests']} requests"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
