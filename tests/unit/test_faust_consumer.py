"""vigil/faust_consumer.py: a delivery that finishes at once runs inline; one that waits still races the
rebalance exactly as in faust (wins, or is cancelled where it waits)."""

from __future__ import annotations

import asyncio
from typing import Any

import faust

from vigil.faust_consumer import Consumer, Transport


def consumer() -> Consumer:
    app = faust.App("t", broker="kafka://127.0.0.1:9", store="memory://", web_enabled=False)
    app.transport = Transport(app.conf.broker_consumer, app)

    async def callback(*_: Any) -> None:  # pragma: no cover - never called here
        return None

    made = app.transport.create_consumer(
        callback=callback, on_partitions_revoked=callback, on_partitions_assigned=callback
    )
    assert isinstance(made, Consumer)
    return made


async def test_a_delivery_that_does_not_wait_runs_inline_without_tasks() -> None:
    c = consumer()
    ran: list[str] = []

    async def deliver() -> str:
        ran.append("delivered")
        return "ok"

    suspended = asyncio.Event()
    before = len(asyncio.all_tasks())
    got = await c.wait_first(deliver(), suspended.wait())
    assert ran == ["delivered"] and got.results == ["ok"] and not got.stopped
    assert len(asyncio.all_tasks()) == before  # nothing left behind


async def test_a_delivery_that_waits_goes_on_from_where_it_stopped() -> None:
    c = consumer()
    room = asyncio.Event()
    steps: list[str] = []

    async def deliver() -> str:
        steps.append("first step")
        await room.wait()  # a full stream buffer
        await asyncio.sleep(0)
        steps.append("put")
        return "ok"

    suspended = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, room.set)
    got = await c.wait_first(deliver(), suspended.wait())
    assert steps == ["first step", "put"] and got.results == ["ok"] and not got.stopped


async def test_a_waiting_delivery_loses_to_a_rebalance_and_is_cancelled_where_it_waits() -> None:
    c = consumer()
    room = asyncio.Event()
    cancelled: list[bool] = []

    async def deliver() -> None:
        try:
            await room.wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    suspended = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, suspended.set)
    got = await c.wait_first(deliver(), suspended.wait())
    await asyncio.sleep(0.01)
    assert cancelled == [True]
    assert len(got.done) == 1 and got.done[0] is not None and not got.stopped


async def test_an_error_in_the_first_step_reaches_the_fetch_loop() -> None:
    c = consumer()

    async def deliver() -> None:
        raise ValueError("bad record")

    suspended = asyncio.Event()
    try:
        await c.wait_first(deliver(), suspended.wait())
    except ValueError as e:
        assert str(e) == "bad record"
    else:  # pragma: no cover
        raise AssertionError("the error was swallowed")
