#!/usr/bin/env python3
"""Bytes stored for checkpoint series from real (CPU) training, ckptfs vs three baselines.

Series (each written through a fresh ckptfs mount with plain torch.save / safetensors):
  finetune-fp32     GPT-style model, fp32, AdamW lr 1e-5, full state (model + optimizer) per step file
  pretrain-bf16     the same model in bf16, AdamW lr 1e-3
  frozen-adapters   frozen base, small trainable adapters; model + optimizer per step file
  latest-overwrite  fp32 fine-tuning, one path latest.pt overwritten each time
  hf-rotation       checkpoint-N/model.safetensors + optimizer.pt, oldest directory deleted (save_total_limit=2)
``--arrival paced`` (the default): each save is ingested before the next one (a trainer saving every
few minutes); ``back-to-back``: the saves follow each other as fast as they are written, faster than
ingest; ``both``: each series both ways, side by side (the stored bytes should be the same). Baselines, computed
on the bytes of every version written: zstd-3 per file; byte-grouped zstd-3 per
tensor (the ZipNN approach); per-tensor XOR against the previous checkpoint + byte-grouped zstd-3
(the naive delta). ckptfs keeps what the paths hold at the end plus the bases they need.

    .venv/bin/python scripts/bench_storage.py --json bench-storage.json            # ~25M parameters
    .venv/bin/python scripts/bench_storage.py --d-model 256 --layers 4 --versions 4  # quick look
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard
from benchlib import GPT, cpu_seconds, wait_idle
from benchlib import wait_local as wait_ingested

SERIES = ("finetune-fp32", "pretrain-bf16", "frozen-adapters", "latest-overwrite", "hf-rotation")


def train_states(args: argparse.Namespace, series: str):
    """Yield (step, state dict snapshot) after successive training intervals."""
    torch.manual_seed(0)
    adapters = series == "frozen-adapters"
    model = GPT(args.vocab, args.d_model, args.layers, args.ctx, adapter=8 if adapters else 0)
    dtype = torch.bfloat16 if series == "pretrain-bf16" else torch.float32
    model = model.to(dtype)
    if adapters:
        for name, p in model.named_parameters():
            p.requires_grad = ".adapter." in name
    lr = 1e-3 if series == "pretrain-bf16" else 1e-5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    data = torch.randint(0, args.vocab, (64, args.ctx + 1))
    for v in range(args.versions):
        for s in range(args.steps):
            batch = data[(v * args.steps + s) % 8 :: 8][: args.batch]
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
        yield (v + 1) * args.steps, copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})


def tensors_of(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in tensors_of(v)]
    return []


def grouped(raw: bytes, width: int) -> bytes:
    if width <= 1 or len(raw) % width:
        return raw
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, width).T.tobytes()


class Baselines:
    def __init__(self) -> None:
        self.cctx = zstandard.ZstdCompressor(level=3)
        self.zstd = self.grouped = self.delta = 0
        self.prev: dict[str, list[bytes]] = {}

    def add(self, key: str, file_bytes: bytes, state) -> None:
        self.zstd += len(self.cctx.compress(file_bytes))
        ts = tensors_of(state)
        raws = [t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"" for t in ts]
        overhead = max(0, len(file_bytes) - sum(len(r) for r in raws))
        g = d = overhead
        prev = self.prev.get(key)
        for i, (t, raw) in enumerate(zip(ts, raws, strict=True)):
            w = t.element_size()
            gz = len(self.cctx.compress(grouped(raw, w)))
            g += gz
            if prev is not None and i < len(prev) and len(prev[i]) == len(raw) and raw:
                x = np.bitwise_xor(np.frombuffer(raw, np.uint8), np.frombuffer(prev[i], np.uint8)).tobytes()
                d += min(gz, len(self.cctx.compress(grouped(x, w))))
            else:
                d += gz
        self.grouped += g
        self.delta += d
        self.prev[key] = raws


def write_series(
    args, series: str, mnt: Path, base: Baselines, daemon: int, paced: bool = True
) -> tuple[int, float, float, list[tuple[Path, bytes]]]:
    """Write one series into the mount; return logical bytes, seconds from close to ingested, CPU seconds
    the daemon spent in those windows, the files that remain. ``paced``: wait for each save's ingest
    before the next; else train first and save every state back to back (seconds and CPU then count
    from the first save to the last one's ingest)."""
    logical = 0
    ingesting = cpu = 0.0
    kept: dict[Path, bytes] = {}

    def wait_local(paths: list[Path]) -> float:
        return wait_ingested(paths) if paced else 0.0

    states = train_states(args, series)
    if not paced:  # train first, then save as fast as the mount takes it: faster than ingest
        states = iter(list(states))
        t0, c0 = time.perf_counter(), cpu_seconds(daemon)
    for step, state in states:
        if series == "hf-rotation":
            from safetensors.torch import save as st_save

            d = mnt / f"checkpoint-{step}"
            d.mkdir()
            model_bytes = st_save({k: v.contiguous() for k, v in state["model"].items()})
            buf = io.BytesIO()
            torch.save(state["optimizer"], buf)
            files = {d / "model.safetensors": model_bytes, d / "optimizer.pt": buf.getvalue()}
            (d / "model.safetensors").write_bytes(model_bytes)
            with open(d / "optimizer.pt", "wb") as f:
                torch.save(state["optimizer"], f)
            c0 = cpu_seconds(daemon)
            ingesting += wait_local(list(files))
            cpu += cpu_seconds(daemon) - c0
            base.add("model", model_bytes, state["model"])
            base.add("optimizer", buf.getvalue(), state["optimizer"])
            dirs = [p for p in mnt.iterdir() if p.name.startswith("checkpoint-")]
            dirs.sort(key=lambda p: int(p.name[len("checkpoint-") :]))
            for old in dirs[:-2]:
                for p in list(kept):
                    if p.parent == old:
                        del kept[p]
                shutil.rmtree(old)
        else:
            path = mnt / ("latest.pt" if series == "latest-overwrite" else f"step_{step:06d}.pt")
            buf = io.BytesIO()
            torch.save(state, buf)
            with open(path, "wb") as f:
                torch.save(state, f)
            # Steady state of a trainer saving every few minutes: each save is ingested before the next one.
            c0 = cpu_seconds(daemon)
            ingesting += wait_local([path])
            cpu += cpu_seconds(daemon) - c0
            files = {path: buf.getvalue()}
            base.add("ckpt", buf.getvalue(), state)
        for p, b in files.items():
            logical += len(b)
            kept[p] = b
    if not paced:  # from the first save to the last one's ingest: sustained throughput
        wait_ingested(list(kept))
        ingesting, cpu = time.perf_counter() - t0, cpu_seconds(daemon) - c0
    return logical, ingesting, cpu, list(kept.items())




def wait_settled(db_path: Path, timeout: float = 600) -> None:
    """Wait until the background re-encoding is done: no chunk is held only by deltas coded against it
    (deleted bases re-encoded away) and pcodec compaction has tried every chunk."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout
    try:
        while db.execute(
            "SELECT count(*) FROM chunks c WHERE refcount > 0"
            " AND refcount <= (SELECT count(*) FROM chunks d WHERE d.base = c.id)"
        ).fetchone()[0] or db.execute("SELECT count(*) FROM compact_queue").fetchone()[0]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{db_path}: repack and compaction not done after {timeout}s")
            time.sleep(0.2)
    finally:
        db.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--versions", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="training steps between checkpoints")
    ap.add_argument("--series", default=",".join(SERIES))
    ap.add_argument("--max-chain", type=int, default=None, help="override ingest.max_chain")
    ap.add_argument("--pco-level", type=int, default=None, help="override ingest.pco_level")
    ap.add_argument("--arrival", choices=("paced", "back-to-back", "both"), default="paced")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    arrivals = ["paced", "back-to-back"] if args.arrival == "both" else [args.arrival]
    ck = [sys.executable, "-m", "ckptfs"]
    env = {**os.environ}
    if args.max_chain is not None:
        env["CKPTFS_INGEST_MAX_CHAIN"] = str(args.max_chain)
    if args.pco_level is not None:
        env["CKPTFS_INGEST_PCO_LEVEL"] = str(args.pco_level)
    params = sum(p.numel() for p in GPT(args.vocab, args.d_model, args.layers, args.ctx).parameters())
    rows = []
    for series, arrival in [(s, a) for s in args.series.split(",") for a in arrivals]:
        work = Path(tempfile.mkdtemp(prefix="ckptfs-storage-", dir="/var/tmp"))
        mnt = work / "mnt"
        mnt.mkdir()
        subprocess.run([*ck, "mount", "--cache", str(work / "cache"), "--store", f"file://{work}/store", str(mnt)],
                       check=True, env=env, capture_output=True)
        try:
            base = Baselines()
            daemon = int((work / "cache" / "ckptfs.pid").read_text())
            logical, ingest_s, ingest_cpu, kept = write_series(args, series, mnt, base, daemon, arrival == "paced")
            wait_settled(work / "cache" / "meta.db")
            flat = wait_idle(work / "cache")["cache"]["flat_bytes"]  # flat copies made too: local-only bytes
            subprocess.run([*ck, "umount", str(mnt)], check=True, capture_output=True)
            subprocess.run([*ck, "mount", "--cache", str(work / "cache"), "--store", f"file://{work}/store",
                            str(mnt)], check=True, env=env, capture_output=True)
            t0 = time.perf_counter()
            read = 0
            for p, b in kept:
                data = p.read_bytes()
                assert data == b, f"{series}: {p.name} differs after remount"
                read += len(data)
            read_mbps = read / 1e6 / (time.perf_counter() - t0)
            st = json.loads(subprocess.run([*ck, "stats", "--json", str(mnt)], check=True, capture_output=True,
                                           text=True).stdout)["total"]
        finally:
            subprocess.run([*ck, "umount", str(mnt)], check=False, capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
        rows.append({
            "series": series, "arrival": arrival, "logical": logical, "ckptfs": st["stored_bytes"], "flat_copies": flat,
            "zstd3": base.zstd,
            "grouped": base.grouped, "naive_delta": base.delta, "ckptfs_vs_naive": st["stored_bytes"] / base.delta,
            "ingest_MBps": logical / 1e6 / ingest_s,
            "ingest_MB_per_cpu_s": logical / 1e6 / ingest_cpu, "read_MBps": read_mbps, "bit_exact": True,
        })
        r = rows[-1]
        print(f"{series} ({arrival}): logical {logical / 1e6:.0f} MB, ckptfs {r['ckptfs'] / 1e6:.1f} MB"
              f" (+ {flat / 1e6:.1f} MB of flat copies, local only)", flush=True)
    print(f"\n{params / 1e6:.1f}M-parameter GPT, {args.versions} versions x {args.steps} steps;"
          " MB stored (ratio to logical; flat copies of the newest, local only, not counted);"
          f" ingest on {max(1, (os.cpu_count() or 2) - 1)} worker thread(s), close -> local")
    print(f"{'series':<18} {'arrival':<12} {'logical':>8} {'ckptfs':>14} {'zstd-3':>14} {'grouped':>14}"
          f" {'naive delta':>14} {'ck/naive':>8} {'ingest MB/s':>11} {'MB/cpu-s':>8} {'read MB/s':>9} {'flat MB':>8}")
    def cell(r: dict, n: int) -> str:
        return f"{n / 1e6:.1f} ({r['logical'] / n:.2f}x)"

    for r in rows:
        print(f"{r['series']:<18} {r['arrival']:<12} {r['logical'] / 1e6:>8.1f} {cell(r, r['ckptfs']):>14}"
              f" {cell(r, r['zstd3']):>14} {cell(r, r['grouped']):>14} {cell(r, r['naive_delta']):>14}"
              f" {r['ckptfs_vs_naive']:>8.2f}"
              f" {r['ingest_MBps']:>11.0f} {r['ingest_MB_per_cpu_s']:>8.0f} {r['read_MBps']:>9.0f}"
              f" {r['flat_copies'] / 1e6:>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
