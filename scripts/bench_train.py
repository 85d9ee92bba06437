#!/usr/bin/env python3
"""Training throughput lost to checkpointing (CheckFreq's metric: 1 - T_no_checkpoint / T_with), paired runs.

A small GPT (27M parameters at the defaults: its fp32 model + AdamW state is ~330 MB) trains on the CPU
for ``--steps`` steps and ``torch.save``s its state every ``--every`` steps, in each of these
conditions, one after another within a repetition (the order rotates between repetitions):

  none      no checkpoint at all (the reference)
  plain     into a plain directory on the same disk as the cache
  ckptfs    into a ckptfs mount (default config; tiering to a local directory)
  niced     the scheduling before ``ingest.idle``: encoding at nice 10 instead of SCHED_IDLE, and
            compaction whenever ingest is quiet (``ingest.idle_cores = 0``)
  reverse   into a ckptfs mount with ``ingest.newest_keyframe = true``
  cached    into a ckptfs mount with ``mount.direct_writes = false`` (the writes go through the
            mount's page cache, as before that option)

The training loop's wall time includes the saves (what a synchronous trainer pays) and whatever the
daemon's background work takes from it meanwhile. The daemon's work left when the loop ends is not
in it; it is reported as the catch-up time (until ingest, compaction and uploads are done: work
deferred to idle cores shows up there), and each mount is idle before its run starts. Prints
per-condition seconds, catch-up, the loss and each mount's time over the plain directory's in the
same repetition (min / median / max over the ``--reps`` paired repetitions: on a noisy machine the
ratio of two runs side by side moves less than either) and writes JSON.

    .venv/bin/python scripts/bench_train.py --reps 3 --json bench-train.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from benchlib import GPT, cpu_seconds, fmt, mmm, mount, umount, wait_idle

from ckptfs import daemon


def run(
    model: GPT, opt: torch.optim.Optimizer, data: torch.Tensor, args: argparse.Namespace, out: Path | None
) -> tuple[float, float]:
    """Seconds for ``args.steps`` training steps, saving every ``args.every`` into ``out`` (None: never),
    and the seconds of those that the ``torch.save`` calls took."""
    t0 = time.perf_counter()
    saving = 0.0
    for s in range(1, args.steps + 1):
        batch = data[s % 8 :: 8][: args.batch]
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if out is not None and s % args.every == 0:
            t1 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out / f"step_{s:06d}.pt")
            saving += time.perf_counter() - t1
    return time.perf_counter() - t0, saving


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--conditions", default="none,plain,ckptfs,niced")
    ap.add_argument("--json")
    args = ap.parse_args()
    conditions = args.conditions.split(",")

    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=os.environ.get("BENCH_DIR")))
    env = {**os.environ, "CKPTFS_NODE_ID": "bench"}
    mounts = {
        "ckptfs": {},
        "niced": {"CKPTFS_INGEST_IDLE": "false", "CKPTFS_INGEST_IDLE_CORES": "0"},
        "reverse": {"CKPTFS_INGEST_NEWEST_KEYFRAME": "true"},
        "cached": {"CKPTFS_MOUNT_DIRECT_WRITES": "false"},
    }
    for name, extra in mounts.items():
        if name in conditions:
            mount({**env, **extra}, work / f"cache-{name}", work / name, f"file://{work / f'objects-{name}'}")
    (work / "plain").mkdir()
    torch.manual_seed(0)
    model = GPT(args.vocab, args.d_model, args.layers, args.ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, args.vocab, (64, args.ctx + 1))
    params = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {c: [] for c in conditions}
    saving: dict[str, list[float]] = {c: [] for c in conditions if c != "none"}
    daemon_cpu: dict[str, list[float]] = {c: [] for c in conditions if c in mounts}
    catch_up: dict[str, list[float]] = {c: [] for c in conditions if c in mounts}
    try:
        run(model, opt, data, argparse.Namespace(**{**vars(args), "steps": 3}), None)  # warm up (allocator, threads)
        for rep in range(args.reps):
            order = conditions[rep % len(conditions) :] + conditions[: rep % len(conditions)]
            for c in order:
                out = None if c == "none" else work / c
                if c in mounts:
                    wait_idle(work / f"cache-{c}")
                os.sync()
                pid = daemon.read_pid(str(work / f"cache-{c}")) if c in mounts else None
                c0 = cpu_seconds(pid) if pid else 0.0
                dt, dsave = run(model, opt, data, args, out)
                times[c].append(dt)
                line = f"rep {rep}: {c:>8} {dt:7.2f} s ({dt / args.steps * 1e3:.0f} ms/step)"
                if out is not None:
                    saving[c].append(dsave)
                    line += f", saves {dsave:.1f} s"
                    if pid:
                        daemon_cpu[c].append(cpu_seconds(pid) - c0)
                        line += f", daemon CPU in the loop {daemon_cpu[c][-1]:.1f} s"
                    if c in mounts:
                        t0 = time.perf_counter()
                        wait_idle(work / f"cache-{c}")
                        catch_up[c].append(time.perf_counter() - t0)
                        line += f", catch-up {catch_up[c][-1]:.1f} s"
                    for f in out.iterdir():
                        f.unlink()
                print(line, flush=True)
    finally:
        for name in mounts:
            if name in conditions:
                umount(env, work / name)
        shutil.rmtree(work, ignore_errors=True)

    size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3  # + AdamW's 2 moments
    results: dict = {
        "params": params,
        "state_bytes": size,
        "steps": args.steps,
        "every": args.every,
        "reps": args.reps,
        "seconds": times,
        "save_seconds": saving,
        "daemon_cpu_in_loop": daemon_cpu,
        "catch_up_seconds": catch_up,
        "loss": {},
    }
    print(
        f"\n{params / 1e6:.1f}M-parameter GPT (~{size / 1e6:.0f} MB state), {args.steps} steps, a save every"
        f" {args.every}, {args.reps} paired repetitions"
    )
    print(
        f"{'condition':>9} | {'seconds (min / median / max)':>28} | {'catch-up s':>18} |"
        f" {'loss 1 - T_none / T (%)':>23} | T / T_plain (paired)"
    )
    results["vs_plain"] = {}
    for c in conditions:
        after = fmt(mmm(catch_up[c]), 1) if c in catch_up else "-"
        line = f"{c:>9} | {fmt(mmm(times[c]), 2):>28} | {after:>18} |"
        loss = vs_plain = "-"
        if c != "none" and "none" in times:
            losses = [1 - n / t for n, t in zip(times["none"], times[c], strict=True)]
            results["loss"][c] = mmm(losses)
            loss = fmt(mmm([x * 100 for x in losses]), 1)
        if c not in ("none", "plain") and "plain" in times:
            ratios = [t / p for p, t in zip(times["plain"], times[c], strict=True)]
            results["vs_plain"][c] = mmm(ratios)
            vs_plain = fmt(mmm(ratios), 2)
        print(f"{line} {loss:>23} | {vs_plain}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
