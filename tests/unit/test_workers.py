"""Worker priorities: encoding on idle cores only, never at the expense of durable marks or reads."""

from __future__ import annotations

import os

import trio

from ckptfs.files.workers import Workers


def _policy() -> tuple[int, int]:
    return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)


def test_background_encoding_runs_sched_idle_and_everything_else_does_not():
    workers = Workers.create(2, nice=10, idle=True)
    seen: dict[str, tuple[int, int]] = {}

    async def main() -> None:
        seen["background"] = await workers.run_background(_policy)
        seen["io"] = await workers.run_io(_policy)  # durable marks, chunk writes: never idle
        seen["foreground"] = await workers.run_foreground(_policy)
        workers.urgent = lambda: True
        seen["urgent"] = await workers.run_background(_policy)

    trio.run(main)
    assert seen["background"][0] == os.SCHED_IDLE
    assert seen["io"] == (os.SCHED_OTHER, 10)
    assert seen["foreground"] == (os.SCHED_OTHER, 0)
    assert seen["urgent"] == (os.SCHED_OTHER, 10)  # a backlog, a flush or an unmount: no waiting for idle


def test_without_idle_background_work_is_only_niced():
    workers = Workers.create(1, nice=7, idle=False)
    assert trio.run(workers.run_background, _policy) == (os.SCHED_OTHER, 7)


def test_idle_work_is_not_abandoned_by_a_cancel():
    """Like trio.to_thread.run_sync: a call that started finishes, its result is not lost mid-way."""
    workers = Workers.create(1, nice=10, idle=True)
    done: list[int] = []

    def work() -> int:
        import time

        time.sleep(0.2)
        done.append(1)
        return 1

    async def main() -> None:
        with trio.move_on_after(0.05):
            await workers.run_background(work)
        assert done == [1]  # the cancel waited for the call

    trio.run(main)
