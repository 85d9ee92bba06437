"""Delta-stored checkpoints through a real mount: base selection, bit-exact reads, bounded chains."""

from __future__ import annotations

import copy
import errno
import json
import os
import sqlite3

import pytest
import torch

from tests.helpers import assert_state_equal, flip_stored_byte


def train_series(n: int, dtype=torch.float32, width: int = 512, lr: float = 1e-4, seed: int = 0):
    """States of a small MLP after successive AdamW steps (deep copies, so each is a snapshot)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    out = []
    for step in range(n):
        for _ in range(2):
            x = torch.randn(16, width, dtype=dtype)
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        out.append(copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}))
    return out


def deltas(v) -> int:
    return sum(n for k, n in v["codecs"].items() if k.startswith("delta"))


def versions(mount, rel=""):
    res = mount.cli("ls-versions", "--json", str(mount.path(rel)) if rel else str(mount.mnt))
    return {v["path"]: v for v in json.loads(res.stdout)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_series_reads_back_bit_exact_after_its_bases_are_deleted(mount, dtype):
    states = train_series(4, dtype)
    mount.path("run").mkdir()
    names = [f"run/step_{i:06d}.pt" for i in range(4)]
    for name, state in zip(names, states, strict=True):
        torch.save(state, mount.path(name))
        mount.wait_local(name)
    vs = versions(mount)
    for i, name in enumerate(names[1:], 1):
        assert vs[name]["base_path"] in names[:i], vs[name]  # an earlier checkpoint of the series
        assert deltas(vs[name]) > 0, vs[name]
    for name in names[:3]:
        os.unlink(mount.path(name))
    mount.umount()
    mount.start()
    assert_state_equal(states[3], torch.load(mount.path(names[3])))
    res = mount.cli("fsck", "--cache", str(mount.cache), "--verify-data")
    assert "0 problems" in res.stdout, res.stdout


def test_base_selection_overwrite_rename_new_directory(mount_factory):
    # max_chain 1: every base is a keyframe, so which file serves does not depend on whether the tmp
    # file's ingest starts before or after os.replace (with chains it may first code a few pieces
    # against the old model.pt, still live then; repack re-encodes them once it is gone).
    mount = mount_factory(env={"CKPTFS_INGEST_MAX_CHAIN": "1"})
    states = train_series(5)
    # Overwriting latest.pt: its old content is going away, so it is no base (keeping it would cost more
    # than a keyframe); the path ends up storing one checkpoint, not two.
    torch.save(states[0], mount.path("latest.pt"))
    mount.wait_local("latest.pt")
    one = mount.stats()["total"]["stored_bytes"]
    torch.save(states[1], mount.path("latest.pt"))
    mount.wait_local("latest.pt")
    v = versions(mount)["latest.pt"]
    assert v["base_version"] is None and deltas(v) == 0
    assert mount.stats()["total"]["stored_bytes"] < 1.1 * one

    # A file with the same layout that still exists is a base: keep.pt serves model.pt, which replaces
    # an older model.pt through tmp + rename.
    torch.save(states[2], mount.path("keep.pt"))
    mount.wait_local("keep.pt")
    torch.save(states[0], mount.path("model.pt"))
    mount.wait_local("model.pt")
    torch.save(states[3], mount.path("model.pt.tmp"))
    os.replace(mount.path("model.pt.tmp"), mount.path("model.pt"))
    mount.wait_local("model.pt")
    v = versions(mount)["model.pt"]
    assert deltas(v) > 0 and v["base_path"] in ("keep.pt", "latest.pt"), v

    (mount.path("run1")).mkdir()
    (mount.path("run2")).mkdir()
    other = train_series(2, width=384, seed=1)  # another model: another layout
    torch.save(other[0], mount.path("run1", "step_100.pt"))
    mount.wait_local("run1/step_100.pt")
    torch.save(other[1], mount.path("run2", "step_200.pt"))  # a resumed run writing to a new folder
    mount.wait_local("run2/step_200.pt")
    vs = versions(mount)
    assert vs["run2/step_200.pt"]["base_path"] == "run1/step_100.pt"
    assert vs["run1/step_100.pt"]["base_version"] is None  # nothing of that layout existed before


@pytest.mark.parametrize("dtype,gain", [(torch.float32, 0.97), (torch.bfloat16, 0.85)])
def test_delta_stores_less_than_no_delta(mount_factory, dtype, gain):
    states = train_series(5, dtype)
    stored = {}
    for chain in ("0", "1", "3"):
        m = mount_factory(env={"CKPTFS_INGEST_MAX_CHAIN": chain})
        for i, st in enumerate(states):
            torch.save(st, m.path(f"step_{i}.pt"))
            m.wait_local(f"step_{i}.pt")
        stored[chain] = m.stats()["total"]["stored_bytes"]
        for i, st in enumerate(states):
            assert_state_equal(st, torch.load(m.path(f"step_{i}.pt")))
        db = sqlite3.connect(m.cache / "meta.db")
        depth = db.execute("SELECT max(depth) FROM chunks").fetchone()[0]
        db.close()
        assert depth <= int(chain), (chain, depth)  # reads decode at most max_chain deltas
        m.umount()
    assert stored["1"] < gain * stored["0"], stored
    assert stored["3"] < gain * stored["0"], stored


def test_corrupt_base_makes_dependent_reads_fail_with_eio(mount_factory):
    mount = mount_factory(env={"CKPTFS_UPLOAD_ENABLED": "false"})  # no copy in the store to heal from
    states = train_series(2)
    torch.save(states[0], mount.path("a.pt"))
    mount.wait_local("a.pt")
    torch.save(states[1], mount.path("b.pt"))
    mount.wait_local("b.pt")
    assert deltas(versions(mount)["b.pt"]) > 0
    mount.umount()
    mount.expect_errors = True
    db = sqlite3.connect(mount.cache / "meta.db")
    bases = [bytes(r[0]) for r in db.execute("SELECT DISTINCT base FROM chunks WHERE base IS NOT NULL")]
    db.close()
    assert bases
    for cid in bases:  # flip one byte in every chunk some delta depends on
        flip_stored_byte(mount.cache, cid)
    mount.start()
    with pytest.raises(OSError) as e:
        mount.path("b.pt").read_bytes()
    assert e.value.errno == errno.EIO
    res = mount.cli("fsck", "--cache", str(mount.cache), "--verify-data", check=False)
    assert res.returncode == 1


def test_dcp_shards_get_positional_delta(mount):
    """torch.distributed.checkpoint shards are not parsed; a same-named, same-sized shard of an earlier
    step still lines up piece by piece (step_100/__0_0.distcp -> step_200/__0_0.distcp)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    state = {"w": torch.randn(1024, 1024) * 0.02, "b": torch.randn(1024)}
    snapshots = []
    for step in (100, 200, 300):
        state["w"] += torch.randn(1024, 1024) * 1e-6
        dcp.save(state, checkpoint_id=str(mount.path(f"step_{step}")))
        snapshots.append({k: v.clone() for k, v in state.items()})
        mount.wait_local(f"step_{step}/__0_0.distcp")
    vs = versions(mount)
    assert vs["step_100/__0_0.distcp"]["layout"] == "cdc"  # nothing to line up with yet
    assert vs["step_200/__0_0.distcp"]["layout"] == "positional"
    third = vs["step_300/__0_0.distcp"]
    assert third["layout"] == "positional" and deltas(third) > 0, third
    assert third["base_path"] == "step_200/__0_0.distcp"
    assert third["stored"] < 0.8 * vs["step_200/__0_0.distcp"]["stored"]
    mount.umount()
    mount.start()
    out = {"w": torch.empty(1024, 1024), "b": torch.empty(1024)}
    dcp.load(out, checkpoint_id=str(mount.path("step_300")))
    assert_state_equal(snapshots[2], out)


def test_back_to_back_saves_are_each_coded_against_the_one_before(mount_factory):
    """Saves that arrive faster than ingest (no wait in between) are ingested in order per layout: each
    version's bases come from the version right before it, as when each save is ingested before the
    next, and they store what a paced series of the same kind stores (within 3 %)."""
    mount = mount_factory(env={"CKPTFS_INGEST_PCO_LEVEL": "0"})  # compaction would run at other times
    mount.path("paced").mkdir()
    mount.path("fast").mkdir()
    for i, state in enumerate(train_series(5, seed=0)):
        torch.save(state, mount.path(f"paced/step_{i}.pt"))
        mount.wait_local(f"paced/step_{i}.pt")
    for i, state in enumerate(train_series(5, seed=1)):  # another run of the same model, back to back
        torch.save(state, mount.path(f"fast/step_{i}.pt"))
    mount.wait_local(*[f"fast/step_{i}.pt" for i in range(5)])
    vs = versions(mount)
    for kind in ("paced", "fast"):
        for i in range(1, 5):
            v = vs[f"{kind}/step_{i}.pt"]
            assert v["base_path"] == f"{kind}/step_{i - 1}.pt", (kind, i, v)
    stored = {k: sum(vs[f"{k}/step_{i}.pt"]["stored"] for i in range(1, 5)) for k in ("paced", "fast")}
    assert abs(stored["fast"] - stored["paced"]) <= 0.03 * stored["paced"], stored
