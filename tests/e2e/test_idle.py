"""Background work on idle cores (files/workers.py, files/cpuload.py): with every core kept busy by
other processes, compaction waits and ingest waits no longer than ``ingest.idle_wait_s``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from tests.e2e.test_compact import wait_compacted
from tests.e2e.test_delta import train_series
from tests.helpers import assert_state_equal


def _queued(db) -> int:
    return int(db.execute("SELECT count(*) FROM compact_queue").fetchone()[0])


def _burn(per_core: int = 1) -> list[subprocess.Popen[bytes]]:
    """A CPU trainer on every core (``per_core`` processes each: a SCHED_IDLE thread's sliver of a core
    shrinks with every busy process on it)."""
    n = per_core * (os.cpu_count() or 2)
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(burners: list[subprocess.Popen[bytes]]) -> None:
    for p in burners:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_compaction_waits_while_other_processes_keep_every_core_busy(mount_factory):
    """Compaction is optional work: it waits for an idle core (``ingest.idle_cores``). Ingest at plain
    nice here, so only that gate holds compaction back."""
    m = mount_factory(env={"CKPTFS_INGEST_IDLE": "false"})
    state = train_series(1, width=768)[0]
    burners = _burn()
    try:
        time.sleep(1.5)  # the load is measured over a window
        torch.save(state, m.path("a.pt"))
        m.wait_local("a.pt", timeout=90)
        db = sqlite3.connect(m.cache / "meta.db")
        assert _queued(db) > 0
        time.sleep(5)  # well past the 2 s of quiet compaction waits for anyway
        assert _queued(db) > 0, "compaction ran while no core was idle"
    finally:
        _stop(burners)
    wait_compacted(m, timeout=90)  # the cores are idle again
    assert_state_equal(state, torch.load(m.path("a.pt")))


@pytest.mark.slow
@pytest.mark.parametrize("wait_s", [2.0, 600.0])
def test_ingest_waits_for_idle_cores_at_most_idle_wait_s(mount_factory, wait_s):
    """SCHED_IDLE ingest gets no CPU while every core is busy; after ``ingest.idle_wait_s`` it runs at
    ``ingest.nice`` and the file becomes ``local`` (600 s: still staged 15 s after the close)."""
    m = mount_factory(env={"CKPTFS_INGEST_IDLE_WAIT_S": str(wait_s)})
    # 100 / 226 MB: SCHED_IDLE's sliver of a busy core does not ingest it in 15 s. (With one burner per
    # core and 100 MB, a CI run once saw it ingested by then: the idle sliver is a few ms per tick.)
    state = train_series(1, width=2048 if wait_s < 10 else 3072)[0]
    burners = _burn(per_core=2)
    try:
        time.sleep(1)  # every burner running before the close
        torch.save(state, m.path("a.pt"))
        if wait_s < 10:
            m.wait_local("a.pt", timeout=90)
        else:
            time.sleep(15)
            assert m.state("a.pt") == "staged"
            st = json.loads(m.cli("status", "--json", str(m.mnt)).stdout)
            assert st["encoding"] == "idle cores" and st["ingest_pending"] == 1, st
            assert st["ingest_oldest_wait_s"] >= 10 and st["others_busy_cores"] >= 1, st
    finally:
        _stop(burners)
    m.wait_local("a.pt", timeout=90)
    assert_state_equal(state, torch.load(m.path("a.pt")))
