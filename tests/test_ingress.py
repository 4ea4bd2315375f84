"""The doors' gate while steps decode (``daemon/ingress.py``): new work waits while the event
loop has had its share of the step, and never when nothing decodes; through a real daemon, a
flood held at the gate is answered in full and another client's stream goes on."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
import zmq

from conftest import DaemonProcess
from lorad.client import Client
from lorad.daemon.ingress import ALLOWANCE_S, Ingress
from lorad.protocol.codec import decode_reply

TAG = b"lorad/1"


def spin(seconds: float) -> None:
    """Keep the event loop busy (no checkpoint) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_nothing_waits_while_nothing_decodes() -> None:
    ingress = Ingress(share=0.1)
    trio.lowlevel.add_instrument(ingress)
    try:
        spin(0.01)
        with trio.testing.assert_no_checkpoints():
            await ingress.admit()
        assert ingress.over() == 0 and ingress.waits == 0
    finally:
        trio.lowlevel.remove_instrument(ingress)


async def test_work_waits_for_the_step_once_the_loop_has_had_its_share() -> None:
    ingress = Ingress(share=0.1)
    trio.lowlevel.add_instrument(ingress)
    order: list[str] = []

    async def door() -> None:
        await ingress.admit()
        order.append("admitted")

    try:
        async with trio.open_nursery() as nursery:
            with ingress.decoding():
                spin(30 * ALLOWANCE_S)  # the loop works through the step's first 30 ms
                # busy ~= elapsed: its share (0.1) catches up only ~9x later (~0.26 s)
                assert ingress.over() > 0
                nursery.start_soon(door)
                await trio.testing.wait_all_tasks_blocked()
                assert order == [] and ingress.waits == 1
                order.append("step ended")
        assert order == ["step ended", "admitted"]
        with trio.testing.assert_no_checkpoints():
            await ingress.admit()  # between steps: at once
        assert ingress.info()["waits"] == 1 and ingress.info()["busy_s"] > 0
    finally:
        trio.lowlevel.remove_instrument(ingress)


async def test_a_long_step_lets_work_in_as_its_share_catches_up() -> None:
    """The wait is bounded by the share, not by the step: in a step that goes on, held work
    comes in once the loop's busy time is back under 1 ms + share x the step's time."""
    ingress = Ingress(share=0.5)
    trio.lowlevel.add_instrument(ingress)
    try:
        with ingress.decoding():
            spin(4 * ALLOWANCE_S)
            held = time.perf_counter()
            due = ingress.over()
            assert due > 0
            await ingress.admit()  # the loop idles meanwhile: its share catches up
            # in (not before the share had caught up), while the step still decodes (the
            # loop's busy time only grows, so the wait is at least what was due)
            assert time.perf_counter() - held >= due
            assert ingress.waits >= 1
    finally:
        trio.lowlevel.remove_instrument(ingress)


async def test_slow_file_work_starts_within_the_share_and_is_charged_to_it() -> None:
    """File work runs on worker threads, but its Python competes with the decode all the same:
    a call waits at the gate before it starts, and its time counts as the loop's."""
    from lorad.daemon.workers import Pool

    ingress = Ingress(share=0.1)
    pool = Pool("file", 1, gate=ingress)
    trio.lowlevel.add_instrument(ingress)
    order: list[str] = []

    async def file_work() -> None:
        await pool.run(spin, 0.005)
        order.append("worked")

    try:
        before = ingress.busy()
        await pool.run(spin, 0.005)  # nothing decodes: at once, and charged
        assert ingress.busy() - before >= 0.005
        async with trio.open_nursery() as nursery:
            with ingress.decoding():
                spin(30 * ALLOWANCE_S)
                nursery.start_soon(file_work)
                await trio.testing.wait_all_tasks_blocked()
                assert order == [] and ingress.waits == 1
                order.append("step ended")
        assert order == ["step ended", "worked"]
    finally:
        trio.lowlevel.remove_instrument(ingress)


def test_a_flood_held_at_the_gate_is_answered_in_full_beside_a_stream(
        daemon: DaemonProcess, client: Client, tiny_model: Path) -> None:
    n = 20_000
    flooder = zmq.Context.instance().socket(zmq.DEALER)
    flooder.setsockopt(zmq.LINGER, 0)
    flooder.connect(daemon.endpoint)
    try:
        with client.create_context(tiny_model, n_ctx=512) as ctx:
            stream = ctx.generate("Hello world, the cat", max_tokens=200, temperature=0)
            for i in range(n):  # pipelined, none read until the stream is done
                flooder.send_multipart([TAG, msgpack.packb({"v": 1, "id": i, "op": "ping",
                                                            "args": {}})])
            stream.collect()
            assert stream.metrics["generated_tokens"] >= 1
        ids = []
        while len(ids) < n:
            assert flooder.poll(30_000), f"{len(ids)} of {n} pings answered"
            reply = decode_reply(flooder.recv_multipart())
            if reply.kind == "result":
                ids.append(reply.id)
        assert ids == list(range(n))  # every one, in order
        ingress = client.status()["ingress"]
        assert ingress["loop_share"] == 0.1 and ingress["busy_s"] > 0
    finally:
        flooder.close()


def test_a_loop_share_that_means_nothing_is_refused(tmp_path: Path) -> None:
    from lorad.daemon.config import load_config
    from lorad.daemon.errors import ConfigError

    path = tmp_path / "lorad.toml"
    for bad in ("0", "-1", "true", '"fast"'):
        path.write_text(f"[batching]\nloop_share = {bad}\n")
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert err.value.details["field"] == "loop_share"
    path.write_text("[batching]\nloop_share = 0.5\n")
    assert load_config(path).batching.loop_share == 0.5
