"""torch.save / torch.load through a real mount: bit-exact, and identical data stored once."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import assert_state_equal, digest, make_state


def test_torch_roundtrip_model_and_adamw(mount, tmp_path):
    state = make_state(steps=2)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    mount.path("run7").mkdir()
    torch.save(state, mount.path("run7", "step_000100.pt"))
    torch.save(state, ref_dir / "step_000100.pt")  # same file name: same archive folder inside the zip
    # Served from the staging file, right after close.
    assert digest(mount.path("run7", "step_000100.pt")) == digest(ref_dir / "step_000100.pt")
    mount.wait_local("run7/step_000100.pt")
    # Served from chunks; and again after a remount (nothing cached in the daemon).
    assert digest(mount.path("run7", "step_000100.pt")) == digest(ref_dir / "step_000100.pt")
    mount.umount()
    mount.start()
    assert mount.state("run7/step_000100.pt") in ("local", "remote")
    assert digest(mount.path("run7", "step_000100.pt")) == digest(ref_dir / "step_000100.pt")
    loaded = torch.load(mount.path("run7", "step_000100.pt"))
    assert_state_equal(state, loaded)


def test_same_checkpoint_under_two_names_is_stored_once(mount):
    state = make_state(width=512, layers=4)
    torch.save(state, mount.path("a.pt"))
    mount.wait_local("a.pt")
    one = mount.stats()["total"]
    torch.save(state, mount.path("b.pt"))  # different archive folder ("b"), same tensor records
    mount.wait_local("b.pt")
    two = mount.stats()["total"]
    assert two["logical_bytes"] == 2 * one["logical_bytes"]
    assert two["stored_bytes"] < 1.05 * one["stored_bytes"], (one, two)
    assert two["dedup_ratio"] > 1.9


def test_torch_overwrite_latest_and_tmp_rename(mount):
    """The two patterns trainers use: overwrite latest.pt, and write tmp then os.replace."""
    for step in range(3):
        state = make_state(seed=step)
        torch.save(state, mount.path("latest.pt"))
        tmp = mount.path(f".ckpt.tmp{step}")
        torch.save(state, tmp)
        os.replace(tmp, mount.path("model.pt"))
        assert_state_equal(state, torch.load(mount.path("latest.pt")))
        assert_state_equal(state, torch.load(mount.path("model.pt")))
    mount.wait_local("latest.pt", "model.pt")
    assert sorted(os.listdir(mount.mnt)) == ["latest.pt", "model.pt"]
    mount.umount()
    mount.start()
    assert_state_equal(make_state(seed=2), torch.load(mount.path("model.pt")))
    # Superseded versions were released: the store holds about one checkpoint, not three.
    total = mount.stats()["total"]
    assert total["chunk_bytes"] < 0.75 * total["logical_bytes"] + 200_000, total


@pytest.mark.slow
def test_eight_ranks_write_at_once(mount):
    script = (
        "import sys, torch\n"
        "from tests.helpers import make_state\n"
        "rank = int(sys.argv[2])\n"
        "for step in range(3):\n"
        "    torch.save(make_state(seed=rank * 10 + step, width=192), f'{sys.argv[1]}/step{step}/rank{rank}.pt')\n"
    )
    import subprocess
    import sys

    for step in range(3):
        mount.path(f"step{step}").mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(mount.mnt), str(rank)], cwd=os.getcwd())
        for rank in range(8)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * 8
    for step in range(3):
        for rank in range(8):
            assert_state_equal(make_state(seed=rank * 10 + step, width=192),
                               torch.load(mount.path(f"step{step}", f"rank{rank}.pt")))
    mount.wait_local(*[f"step{s}/rank{r}.pt" for s in range(3) for r in range(8)], timeout=300)
    mount.umount()
    mount.start()
    for rank in range(8):
        assert_state_equal(make_state(seed=rank * 10 + 2, width=192), torch.load(mount.path("step2", f"rank{rank}.pt")))
    assert mount.cli("fsck", "--cache", str(mount.cache), "--verify-data").returncode == 0
