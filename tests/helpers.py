"""Small helpers shared by the tests: tiny models and state dicts that look like real checkpoints."""

from __future__ import annotations

import hashlib
import signal
import subprocess
from pathlib import Path


def make_state(seed: int = 0, width: int = 256, layers: int = 4, steps: int = 1):
    """A model + AdamW state dict after ``steps`` training steps (deterministic)."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        model(torch.randn(8, width)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": steps}


def assert_state_equal(a, b) -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    else:
        assert a == b


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def flip_stored_byte(cache: Path, cid: bytes, pos: int = -1) -> None:
    """Flip a bit of byte ``pos`` of chunk ``cid``'s stored frame (a file, or a row of ``frames``)
    in the cache directory of a stopped daemon."""
    import sqlite3

    path = cache / "chunks" / cid.hex()[:2] / cid.hex()
    db = sqlite3.connect(cache / "meta.db")
    try:
        row = db.execute("SELECT frame FROM frames WHERE chunk=?", (cid,)).fetchone()
        frame = bytearray(row[0] if row is not None else path.read_bytes())
        frame[pos] ^= 0x40
        if row is not None:
            db.execute("UPDATE frames SET frame=? WHERE chunk=?", (bytes(frame), cid))
            db.commit()
        else:
            path.write_bytes(bytes(frame))
    finally:
        db.close()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Send ``sig``, wait up to ``timeout`` s, then SIGKILL."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
