"""The gate between ingest jobs (shared) and repack/compaction (exclusive)."""

from __future__ import annotations

import trio

from ckptfs.files.gate import Gate


async def test_exclusive_waits_for_every_shared_holder_and_blocks_new_ones(autojump_clock):
    gate = Gate()
    log: list[str] = []

    async def shared(name: str, hold: float) -> None:
        async with gate.shared():
            log.append(f"{name}+")
            await trio.sleep(hold)
            log.append(f"{name}-")

    async def exclusive() -> None:
        async with gate.exclusive():
            log.append("X+")
            await trio.sleep(1)
            log.append("X-")

    async with trio.open_nursery() as n:
        n.start_soon(shared, "a", 2)
        n.start_soon(shared, "b", 3)
        await trio.sleep(0.5)
        n.start_soon(exclusive)
        await trio.sleep(3)  # "b" ends at 3; the exclusive holder runs from 3 to 4
        n.start_soon(shared, "c", 1)  # arrives while the exclusive holder runs: waits for it
    assert set(log[:2]) == {"a+", "b+"}  # both shared holders at once
    assert log[2:] == ["a-", "b-", "X+", "X-", "c+", "c-"]


async def test_cancelled_holders_release_the_gate(autojump_clock):
    gate = Gate()
    with trio.move_on_after(1):
        async with gate.shared():
            await trio.sleep_forever()
    with trio.move_on_after(1):
        async with gate.exclusive():
            await trio.sleep_forever()
    with trio.fail_after(1):
        async with gate.exclusive():
            pass
