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


def test_cpu_load_counts_other_processes_busy_cores_over_a_window():
    from ckptfs.files.cpuload import CpuLoad

    now = [0.0]
    stat = [(0, 0)]  # (busy, total) ticks of all CPUs
    own = [0]
    load = CpuLoad(cores=2, window_s=0.5, proc_stat=lambda: stat[0], own_ticks=lambda: own[0], clock=lambda: now[0])
    assert load.others_busy() == 0.0  # no window yet
    now[0], stat[0], own[0] = 1.0, (150, 200), 20  # 1 s = 100 ticks per CPU: 150 busy, 20 of them ours
    assert load.others_busy() == 1.3
    assert load.free_cores() == 0.7
    now[0], stat[0] = 1.2, (350, 240)  # within the window: the last value stands
    assert load.others_busy() == 1.3
    now[0], stat[0], own[0] = 2.0, (160, 400), 30  # only we were busy
    assert load.others_busy() == 0.0
    load = CpuLoad(cores=2, proc_stat=lambda: (_ for _ in ()).throw(OSError("no /proc")))
    assert load.others_busy() == 0.0  # unreadable: nothing ever waits


def test_cpu_load_reads_this_machine():
    from ckptfs.files.cpuload import CpuLoad

    load = CpuLoad(window_s=0.0)
    load.others_busy()
    sum(i * i for i in range(200_000))  # our own work is not "others"
    assert 0.0 <= load.others_busy() <= load.cores


def test_idle_work_waits_while_other_processes_leave_no_core_free():
    """SCHED_IDLE alone still takes a CPU trainer's gaps; encoding does not start until a core is free."""
    workers = Workers.create(1, nice=10, idle=True)
    taken = [True]
    workers.no_core = lambda: taken[0]
    ran: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run_background, lambda: ran.append(1.0))
            await trio.sleep(0.5)
            assert ran == []  # still waiting for a core
            taken[0] = False
        assert len(ran) == 1
        taken[0] = True
        workers.urgent = lambda: True  # a backlog, a flush, an unmount: no waiting for a core either
        with trio.fail_after(5):
            assert await workers.run_background(_policy) == (os.SCHED_OTHER, 10)

    trio.run(main)


def test_cpu_load_counts_only_the_given_threads_as_its_own():
    """The daemon's FUSE loop serving a save is busy time like the trainer's; its idle pool is not."""
    import threading

    from ckptfs.files.cpuload import thread_ticks

    tid = threading.get_native_id()
    before = thread_ticks([tid])
    sum(i * i for i in range(3_000_000))
    assert thread_ticks([tid]) > before
    assert thread_ticks([2**30]) == 0  # a thread that is gone counts nothing
