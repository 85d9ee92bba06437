#!/usr/bin/env python3
"""Train a small model for a few steps and torch.save a checkpoint series into DIR (a ckptfs mount).

Checks every checkpoint loads back bit-exact, waits until all are ingested, and prints how long
each save blocked the trainer.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    root = Path(sys.argv[1])
    run = root / "run7"
    run.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(4096, 256), torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256),
        torch.nn.Linear(256, 4096),
    )
    model[0].requires_grad_(False)  # a frozen embedding: identical bytes in every checkpoint
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    saved = []
    for step in range(1, 6):
        for _ in range(5):
            x = torch.randint(0, 4096, (16, 32))
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step * 5}
        path = run / f"step_{step * 5:06d}.pt"
        t0 = time.perf_counter()
        torch.save(state, path)
        blocked = time.perf_counter() - t0
        torch.save(state, root / "latest.pt")  # the overwrite-latest pattern
        saved.append((path, copy.deepcopy(state["model"])))
        print(f"saved {path.name}: {path.stat().st_size / 1e6:.1f} MB, torch.save blocked {blocked:.3f} s,"
              f" state {os.getxattr(path, 'user.ckptfs.state').decode()}")
    for path, weights in saved:
        loaded = torch.load(path)
        for k, v in weights.items():
            assert torch.equal(v, loaded["model"][k]), f"{path}: {k} differs"
    print("every checkpoint loads back bit-exact")
    t0 = time.perf_counter()
    for path in [p for p, _ in saved] + [root / "latest.pt"]:
        while os.getxattr(path, "user.ckptfs.state") == b"staged":
            time.sleep(0.05)
    waited = time.perf_counter() - t0
    print(f"all checkpoints chunked, deduplicated and compressed ({waited:.1f} s after the last save)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
