"""What the benchmarks share: the ckptfs CLI, an MLP trainer and a small GPT that make realistic
checkpoint series, waiting for a daemon to go idle, CPU time of a process, the page cache, and
min / median / max."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ckptfs import control  # noqa: E402


def cli(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "ckptfs", *args], capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode:
        raise RuntimeError(f"ckptfs {' '.join(args)}: {res.stdout}{res.stderr}")
    return res.stdout


def mount(env: dict[str, str], cache: Path, mnt: Path, store: str) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    cli(env, "mount", "--cache", str(cache), "--store", store, str(mnt))


def umount(env: dict[str, str], mnt: Path) -> None:
    cli(env, "umount", str(mnt))


def trainer(params_m: float) -> Callable[[int], dict]:
    """``steps(n)``: n AdamW steps of an fp32 MLP of ``params_m`` million parameters, then its state
    (model + optimizer), as a training job would torch.save it."""
    torch.manual_seed(0)
    width = 2048
    layers = max(1, round(params_m * 1e6 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def steps(n: int) -> dict:
        for _ in range(n):
            model(torch.randn(8, width)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    return steps


class Block(torch.nn.Module):
    def __init__(self, d: int, adapter: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, max(1, d // 64), batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
        self.adapter = (
            torch.nn.Sequential(torch.nn.Linear(d, adapter), torch.nn.Linear(adapter, d)) if adapter else None
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return x + self.adapter(x) if self.adapter is not None else x


class GPT(torch.nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, ctx: int, adapter: int = 0) -> None:
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.ModuleList(Block(d, adapter) for _ in range(layers))
        self.ln, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.tok(idx) + self.pos(torch.arange(t))
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def wait_idle(cache: Path, timeout: float = 900) -> dict:
    """Until the daemon has nothing to ingest, compact, flatten or upload; returns its last status."""
    t0 = time.perf_counter()
    while True:
        st = control.request(str(cache), {"op": "status"})
        queued = st["upload"]["queued_versions"] if st["upload"] else 0  # None: tiering is off
        if not st["ingest_pending"] and not st["compaction_pending"] and not st["flatten_pending"] and not queued:
            return st
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"daemon not idle after {timeout} s: {st}")
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_caches() -> None:
    """Write back and drop the kernel's page cache (root only), as after a reboot."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mmm(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def fmt(d: dict[str, float], digits: int = 3) -> str:
    return f"{d['min']:.{digits}f} / {d['median']:.{digits}f} / {d['max']:.{digits}f}"


def wait_local(paths: list[Path], timeout: float = 600, poll: float = 0.025) -> float:
    """Seconds until every path is ingested (state no longer ``staged``), counted from the call — from
    the last close when called right after it.

    Polls every 25 ms: each poll is a FUSE getxattr the daemon answers, and at 10 ms the polls were ~3 %
    of the daemon CPU a benchmark charges to ingest; the wall time may read up to ``poll`` long."""
    t0 = time.perf_counter()
    for p in paths:
        while os.getxattr(p, "user.ckptfs.state") == b"staged":
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{p} not ingested after {timeout}s")
            time.sleep(poll)
    return time.perf_counter() - t0
