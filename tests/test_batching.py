"""Continuous batching through a real daemon on a tiny model: contexts of one model decode in
shared batches, and each keeps its promises (output, prefix cache, n_ctx, cancel, credit)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, start_daemon
from lorad.client import Client, ContextOverflow

PROMPTS = ["Hello world, the cat and the dog", "Once upon a time there was",
           "The quick brown fox jumps", "In the beginning the"]
N = 24
EXACT = {"n_ctx": 256, "kv_type": "f32", "flash_attn": False}


@pytest.fixture(scope="module")
def batch_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
                 tiny_model: Path) -> Iterator[DaemonProcess]:
    workdir = tmp_path_factory.mktemp("batching")
    config = workdir / "lorad.toml"  # slabs are freed with their last context (not kept idle)
    config.write_text("[batching]\nkeep_idle_s = 0\n")
    d = start_daemon(workdir, [models_dir], "--config", str(config))
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture
def client(batch_daemon: DaemonProcess) -> Iterator[Client]:
    with batch_daemon.client() as c:
        yield c
        leftover = [ctx["id"] for ctx in c.list_contexts()]
    assert leftover == [], "a test left contexts open"


def greedy(ctx, prompt: str, n: int = N, **kw) -> list[int]:
    return [t for chunk in ctx.generate(prompt, max_tokens=n, temperature=0, **kw)
            for t in chunk.token_ids]


def slabs(client: Client) -> list[dict]:
    return client.status()["batching"]


def concurrently(d: DaemonProcess, jobs: dict[str, tuple[str, str]]) -> dict[str, list[int]]:
    """Greedy output of each (context id, prompt), all streamed at once from their own
    clients (they start together)."""
    results: dict[str, list[int]] = {}
    barrier = threading.Barrier(len(jobs))

    def stream(name: str, context_id: str, prompt: str) -> None:
        with d.client() as c:
            barrier.wait(10)
            results[name] = greedy(c.context(context_id), prompt)

    threads = [threading.Thread(target=stream, args=(name, *job)) for name, job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_contexts_decode_together_and_give_their_output_alone(
        client: Client, batch_daemon: DaemonProcess, tiny_model: Path) -> None:
    alone = {}
    with client.create_context(tiny_model, **EXACT) as ctx:
        for p in PROMPTS:
            ctx.generate("x", max_tokens=1).collect()  # nothing of p cached
            alone[p] = greedy(ctx, p)
    ctxs = [client.create_context(tiny_model, **EXACT, shared=True) for _ in PROMPTS]
    try:
        [slab] = slabs(client)
        assert slab["used"] == 4 and slab["sequences"] == 4
        before = slab["steps"], slab["tokens"]
        began = time.monotonic()
        got = concurrently(batch_daemon, {p: (c.id, p) for c, p in zip(ctxs, PROMPTS, strict=True)})
        ended = time.monotonic()
        assert got == alone
        [slab] = slabs(client)
        steps, tokens = slab["steps"] - before[0], slab["tokens"] - before[1]
        assert tokens >= 4 * (N - 1)
        assert steps < tokens / 2, (steps, tokens)  # several sequences in most batches
        # the last steps, on this process's monotonic clock: these, one after the other
        timeline = [t for t in slab["timeline"] if t[0] >= began]
        assert len(timeline) <= steps and sum(n for _, _, n in timeline) == tokens
        assert all(a[0] + a[1] / 1000 <= b[0] for a, b in itertools.pairwise(timeline))
        assert timeline[-1][0] + timeline[-1][1] / 1000 <= ended
    finally:
        for c in ctxs:
            c.close()
    assert slabs(client) == []  # the last context freed the batched llama context


def test_a_full_slab_widens_and_keeps_the_others_cache(client: Client, tiny_model: Path) -> None:
    ctxs = [client.create_context(tiny_model, **EXACT)]
    try:
        assert [(s["sequences"], s["used"]) for s in slabs(client)] == [(1, 1)]  # its own KV
        first = ctxs[0]
        greedy(first, PROMPTS[0], 4)
        for want in (2, 4, 4, 8):  # a slab doubles when full
            ctxs.append(client.create_context(tiny_model, **EXACT))
            assert [(s["sequences"], s["used"]) for s in slabs(client)] == [(want, len(ctxs))]
        stream = first.generate(PROMPTS[0], max_tokens=2, temperature=0)
        stream.collect()
        n = stream.metrics["prompt_tokens"]
        assert stream.metrics["cached_prompt_tokens"] == n - 1  # moved, not evaluated again
        # a context of another kind (n_ctx) is a sequence of a slab of its own kind
        other = client.create_context(tiny_model, n_ctx=512, kv_type="f32", flash_attn=False)
        ctxs.append(other)
        assert sorted(s["n_ctx_seq"] for s in slabs(client)) == [256, 512]
    finally:
        for c in ctxs:
            c.close()


def test_streams_keep_their_output_while_their_slab_widens(
        client: Client, batch_daemon: DaemonProcess, tiny_model: Path) -> None:
    alone = {}
    with client.create_context(tiny_model, **EXACT) as ctx:
        for p in PROMPTS[:2]:
            ctx.generate("x", max_tokens=1).collect()  # nothing of p cached
            alone[p] = greedy(ctx, p, 40)
    with batch_daemon.client() as a, batch_daemon.client() as b:
        streaming = [a.create_context(tiny_model, **EXACT), b.create_context(tiny_model, **EXACT)]
        # credit 1: each stream waits for its reader, so the slab widens between their steps
        streams = [iter(c.generate(p, max_tokens=40, temperature=0, credit=1))
                   for c, p in zip(streaming, PROMPTS, strict=False)]
        got = [list(next(s).token_ids) for s in streams]
        comers = []
        for _ in range(4):  # 2 -> 4 -> 8 sequences, moving the streams' cells twice
            comers.append(client.create_context(tiny_model, **EXACT))
            for i, s in enumerate(streams):
                got[i] += next(s).token_ids
        for c in comers[:3]:  # contexts going while the streams go on
            c.close()
        assert [(s["sequences"], s["used"]) for s in slabs(client)] == [(8, 3)]
        for i, s in enumerate(streams):
            got[i] += [t for chunk in s for t in chunk.token_ids]
        comers[3].close()
        for c in streaming:
            c.close()
    assert got == [alone[p] for p in PROMPTS[:2]]


async def test_a_client_that_starts_requests_side_by_side_beside_anothers_stream_is_held(
        tmp_path: Path, models_dir: Path, tiny_model: Path) -> None:
    """Through a daemon, while one client streams: another client's requests one at a time
    each start at once (``status().batching[].starts``), never held; once it runs requests
    side by side, its next ones within ``start_interval_s`` are held to the share (``held``).
    Each request's output is what it would be alone. (One at a time, its sequence never waits
    for a turn beside the stream: ``capped``, which a test below counts in process.)"""
    import trio

    from lorad.client import AsyncClient

    config = tmp_path / "lorad.toml"
    config.write_text("[batching]\nprompt_share = 0.05\nstart_interval_s = 3600\n")
    d = start_daemon(tmp_path, [models_dir], "--config", str(config))
    params = {**EXACT, "n_ctx": 4096}  # one slab for all
    prompts = [[3 + (7 * i + k) % 200 for k in range(40)] for i in range(4)]

    async def tokens(ctx, prompt: list[int], n: int = 4) -> list[int]:
        stream = await ctx.generate(tokens=prompt, max_tokens=n, temperature=0)
        return [t async for c in stream for t in c.token_ids]

    async def counters(client) -> tuple[int, int, int]:
        [slab] = (await client.status())["batching"]
        return slab["starts"], slab["held"], slab["capped"]

    try:
        async with AsyncClient(d.endpoint) as a, AsyncClient(d.endpoint) as b:
            streamer = await a.create_context(tiny_model, **params)
            ctx = await b.create_context(tiny_model, **params)
            side = await b.create_context(tiny_model, **params)
            alone = [await tokens(ctx, p) for p in prompts]
            assert await counters(a) == (0, 0, 0)  # nothing streamed beside them

            async def beside(work) -> list:
                done = trio.Event()
                async with trio.open_nursery() as nursery:

                    async def stream() -> None:
                        async with await streamer.generate(
                                tokens=[5] * 8, max_tokens=4000, temperature=0) as s:
                            async for _ in s:
                                if done.is_set():
                                    return
                        raise AssertionError("the stream ended before the other's requests")

                    nursery.start_soon(stream)
                    await trio.sleep(0)  # (a checkpoint: the stream's request goes first)
                    try:
                        return await work()
                    finally:
                        done.set()

            async def one_at_a_time() -> list:
                return [await tokens(ctx, p) for p in prompts]

            assert await beside(one_at_a_time) == alone
            starts, held, capped = await counters(a)
            assert starts >= 1 and held == 0 and capped == 0

            async def side_by_side() -> list:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(tokens, side, [5] * 8, 400)
                    got = [await tokens(ctx, p) for p in prompts]
                    nursery.cancel_scope.cancel()
                return got

            assert await beside(side_by_side) == alone  # whichever of its sequences waited
            assert (await counters(a))[1] >= 1
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("sequences", [2])
def test_a_kind_at_its_widest_gets_another_slab(tmp_path: Path, models_dir: Path,
                                                tiny_model: Path, sequences: int) -> None:
    config = tmp_path / "lorad.toml"
    config.write_text(f"[batching]\nsequences = {sequences}\n")
    d = start_daemon(tmp_path, [models_dir], "--config", str(config))
    try:
        with d.client() as c:
            ctxs = [c.create_context(tiny_model, **EXACT) for _ in range(3)]
            assert [(s["sequences"], s["used"]) for s in slabs(c)] == [(2, 2), (1, 1)]
            outs = [greedy(x, PROMPTS[0], 8) for x in ctxs]
            assert outs[0] == outs[1] == outs[2]
    finally:
        assert d.stop() == 0, d.log()


def test_each_context_keeps_its_own_n_ctx(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, **EXACT) as small, \
         client.create_context(tiny_model, **EXACT) as other:
        greedy(other, PROMPTS[1], 8)
        with pytest.raises(ContextOverflow):
            small.generate(tokens=list(range(3, 3 + 300)), max_tokens=1).collect()
        stream = small.generate(tokens=list(range(3, 3 + 250)), max_tokens=50, temperature=0)
        stream.collect()
        assert stream.finish_reason == "length"
        # 256 cells: the prompt and 6 generated tokens; the 7th is sampled from the last cell
        assert stream.metrics["generated_tokens"] == 7


def test_a_stream_that_stops_reading_leaves_the_batch_and_rejoins(
        client: Client, batch_daemon: DaemonProcess, tiny_model: Path) -> None:
    with client.create_context(tiny_model, **EXACT) as ctx:
        want = greedy(ctx, PROMPTS[2], 40)
    with client.create_context(tiny_model, **EXACT, shared=True) as slow, \
         client.create_context(tiny_model, **EXACT, shared=True) as fast:
        stream = slow.generate(PROMPTS[2], max_tokens=40, temperature=0, credit=1)
        it = iter(stream)
        got = list(next(it).token_ids)  # it waits for credit now, its KV kept
        other = greedy(fast, PROMPTS[3], 40)  # decodes alone meanwhile
        assert len(other) == 40
        got += [t for chunk in it for t in chunk.token_ids]
        assert got == want


def test_cancel_stops_a_long_prompt_between_chunks(client: Client, tiny_model: Path) -> None:
    with client.create_context(tiny_model, n_ctx=4096, n_batch=16) as ctx:
        stream = ctx.generate(tokens=[3 + i % 500 for i in range(4000)], max_tokens=4)
        stream.cancel()
        stream.collect()
        assert stream.finish_reason == "cancelled"
        assert stream.metrics["generated_tokens"] == 0
        [info] = [c for c in client.list_contexts() if c["id"] == ctx.id]
        assert info["cached_tokens"] < 4000


def test_contexts_closing_as_their_client_leaves_do_not_stall_a_drain(
        tmp_path: Path, models_dir: Path, tiny_model: Path) -> None:
    # The contexts are closed by the peer-gone path while SIGTERM drains: the drain waits for
    # them (their slab's scheduler must outlive their last step), and the daemon exits 0.
    for i in range(5):
        workdir = tmp_path / str(i)
        workdir.mkdir()
        d = start_daemon(workdir, [models_dir])
        with d.client() as a, d.client() as b:
            one = a.create_context(tiny_model, n_ctx=128)
            a.create_context(tiny_model, n_ctx=128)
            b.create_context(tiny_model, n_ctx=128)
            greedy(one, PROMPTS[0], 2)
        assert d.stop() == 0, d.log()
        assert d.log().count('"context_closed"') == 3


def test_step_costs_outlive_the_slab_they_were_learnt_on(client: Client, tiny_model: Path
                                                         ) -> None:
    with client.create_context(tiny_model, **EXACT) as ctx:
        greedy(ctx, PROMPTS[0], 8)
        [slab] = slabs(client)
        learnt = slab["step_ms"]
        assert learnt and learnt[0][0] == 1  # one-token steps were timed
    assert slabs(client) == []  # the slab went with its last context
    with client.create_context(tiny_model, **EXACT):
        [slab] = slabs(client)
        assert slab["steps"] == 0  # a new slab that has decoded nothing ...
        assert slab["step_ms"] == learnt  # ... knows what steps of its kind cost


async def test_a_step_wider_than_any_before_on_its_slab_is_not_timed(tiny_model: Path) -> None:
    """Its first touch of llama.cpp's buffers (the output buffer is even allocated anew) would
    make that size look dearer than it is; a step as wide again is timed."""
    import trio

    from lorad.daemon import llama
    from lorad.daemon.batching import SlabScheduler, Step

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    slab = llama.Slab(model, n_seq=2, n_ctx_seq=128, n_batch=64, n_threads=1)
    scheduler = SlabScheduler(slab, budget=64)
    seq = scheduler.attach(128)
    timed: list[list[int]] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.loop)
            await scheduler.run(Step(seq, list(range(5, 25)), [], prompt=True))
            for tokens in ([30, 31], [32], [33, 34, 35], [36, 37, 38], [39, 40], [41]):
                await scheduler.run(Step(seq, tokens, [], outputs=len(tokens)))
                timed.append([size for size, _ in scheduler.cost.table()])
            nursery.cancel_scope.cancel()
    finally:
        slab.close()
        model.close()
    # 2 outputs fit the buffer llama.cpp reserves for 2 sequences; 3 outputs grow it: the
    # first such step is not timed, the second is
    assert timed == [[2], [1, 2], [1, 2], [1, 2, 3], [1, 2, 3], [1, 2, 3]]


def test_a_prompt_tokens_cost_is_learnt_beyond_what_the_step_costs_without_it() -> None:
    """What a prompt token adds to a step: beside decodes, the step's time beyond theirs over
    its prompt tokens; for prompts alone, beyond a one-token step (which their first token
    is) over the tokens after the first. A prompt of one token left alone (a mostly cached
    one, as a client that sends its prompts again has) is a one-token step and teaches
    nothing: counted as a prompt token, its 0 made the median 0 and the share unbounded."""
    from lorad.daemon.batching import StepCost

    cost = StepCost()
    cost.observe(1, 0.020)
    cost.observe(2, 0.024)
    cost.observe_prompt(0, 1, 0.020)  # one token left, alone: nothing learnt
    assert not cost.prompt_samples
    cost.observe_prompt(0, 11, 0.050)  # ten tokens after the first: 3 ms each
    cost.observe_prompt(2, 4, 0.036)  # beside two decodes: 12 ms over 4 tokens
    assert list(cost.prompt_samples) == pytest.approx([0.003, 0.003])


APP = "one client"


@contextmanager
def _two_slabs(tiny_model: Path, n_seq: int) -> Iterator[tuple[Any, Any, Any]]:
    """Two slabs of the tiny model sharing their cores (prompt share 0.5), as schedulers: the
    first one's steps cost 10 ms for one token, and a prompt token adds 2 ms."""
    from lorad.daemon import llama
    from lorad.daemon.batching import Cores, SlabScheduler

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    slabs_ = [llama.Slab(model, n_seq=n_seq, n_ctx_seq=512, n_batch=512, n_threads=1)
              for _ in range(2)]
    cores = Cores(prompt_share=0.5)
    try:
        here, there = (SlabScheduler(s, budget=512, cores=cores) for s in slabs_)
        for _ in range(3):
            here.cost.observe(1, 0.010)
            here.cost.prompt_samples.append(0.002)
        yield here, there, cores
    finally:
        for s in slabs_:
            s.close()
        model.close()


def test_a_prompt_takes_what_keeps_streams_within_their_share(tiny_model: Path) -> None:
    """While contexts stream, a step's prompt tokens may add at most ``prompt_share`` to the
    step (a long prompt never slows a stream by more than half); alone, prompts take the whole
    budget; a stream of another slab of the model limits them too (its step waits for this
    one). All its work is one client's (other clients' streams: the next test)."""
    from lorad.daemon.batching import Step

    # a 10 ms one-token step; a prompt token adds 2 ms
    with _two_slabs(tiny_model, n_seq=5) as (here, there, cores):
        streaming, prompting = here.attach(512), here.attach(512)
        decode = Step(streaming, [5], [], client=APP)
        prompt = Step(prompting, list(range(5, 405)), [], prompt=True, client=APP)

        def picked(*steps: Step) -> tuple[list[Step], int]:
            here._waiting = list(steps)
            return here._pick(), here._room

        # beside one-token decodes (a KV pool per sequence) a prompt chunk is a computation of
        # its own: while what that costs is not known (the prior, half a one-token step, is
        # all of the share) a long prompt rides along, one token a step; once it is learnt,
        # the chunk's tokens get what the share leaves
        assert picked(decode, prompt) == ([decode, prompt], 1)
        here.cost.split_samples.append(0.0005)
        assert picked(decode, prompt) == ([decode, prompt], 2)  # (0.5 x 10 - 0.5 ms) / 2 ms
        short = Step(here.attach(512), list(range(5, 15)), [], prompt=True, client=APP)
        # a new request starts at once (whole, past the share), the long prompt goes on
        assert picked(decode, prompt, short)[1] == 10 + 1
        assert picked(decode, short)[1] == 10
        other = Step(here.attach(512), list(range(5, 65)), [], prompt=True, client=APP)
        # many short ones take turns, the shortest first: together up to the share or 64
        # tokens, whichever is more, and at least one a step
        assert picked(decode, short, other)[1] == 10
        quotas = here._prompt_quotas([short, other], short.key)
        assert (quotas[id(short)], quotas[id(other)]) == (10, 0)
        third = Step(here.attach(512), list(range(5, 25)), [], prompt=True, client=APP)
        assert picked(decode, short, third)[1] == 30  # 10 + 20 <= 64: both at once
        # nothing streams: short prompts alone take the whole budget; a short one beside a
        # long one is a request about to stream, its step held to the share as a stream's
        assert picked(short, third)[1] == 512
        assert picked(prompt, short)[1] == 10 + 1  # 0.5 x 10 ms / 2 ms: the short one whole
        here._waiting = []
        here.free_ids += [other.seq.seq_id, third.seq.seq_id]
        here._waiting = []
        here.free_ids.append(short.seq.seq_id)
        assert picked(prompt) == ([prompt], 512)
        cores.streaming(there, 0.030)  # another slab streams with 30 ms steps
        assert picked(prompt) == ([prompt], 7)
        assert picked(decode, prompt)[1] == 7  # the longer of the two waits: (15 - 0.5) / 2
        cores.streaming(there, None)
        assert picked(prompt)[1] == 7  # for STREAM_GRACE_S still (the next test)
        cores._ended.clear()  # that moment over
        assert picked(prompt)[1] == 512

        # a KV pool per sequence: a prompt chunk of more than one token beside one-token
        # decodes is a computation of its own; once that is known to cost more than the
        # share (8 ms > 0.5 x 10 ms), each long prompt rides along, one token a step (as one
        # more sequence would: 2 and 3 sequences cost 11 and 12 ms), as many as the share
        # allows
        here.cost.split_samples.clear()
        for _ in range(3):
            here.cost.observe(2, 0.011)
            here.cost.observe(3, 0.012)
            here.cost.split_samples.append(0.008)
        assert picked(decode, prompt)[1] == 1
        second = Step(here.attach(512), list(range(5, 305)), [], prompt=True, client=APP)
        assert picked(decode, prompt, second)[1] == 2
        quotas = here._prompt_quotas([prompt, second], prompt.key)
        assert (quotas[id(prompt)], quotas[id(second)]) == (1, 1)
        # a prompt whose sequence id lies far from the streams' would ride with filler rows
        # for the ids between (5 rows: 30 ms); dearer than its own computation, which is over
        # the share too: one token a step, in a computation of its own
        for _ in range(3):
            here.cost.observe(5, 0.030)
        here.attach(512)
        far = Step(here.attach(512), list(range(5, 305)), [], prompt=True, client=APP)
        assert far.seq.seq_id == 4
        assert picked(decode, far)[1] == 1
        assert picked(decode, prompt, far)[1] == 1  # the far one is served first (shorter)
        # unequal counts: split anyway
        drafted = Step(streaming, [5, 6, 7], [], outputs=3, client=APP)
        assert picked(drafted, prompt)[1] == 3  # the linear rule: 0.5 x 12 ms / 2 ms
        assert picked(prompt)[1] == 512  # prompts alone: the whole budget


def test_long_prompts_are_held_for_a_moment_after_a_stream_ended(tiny_model: Path) -> None:
    """For ``STREAM_GRACE_S`` after a generation of a slab ended, a step of long prompts is
    held to the share as if it still streamed, so that the next request of a client that streams
    request after request finds no step of a whole budget under way (512 tokens of another
    client's prompt: its first token 1.7-2.1 s late on gemma 3 270M, ``bench/noisy.py``'s
    prompts flood); after that, prompts alone take the whole budget again. A stream of another
    slab of the model that ended holds them alike; short prompts alone are not held, nor the
    prompts of the client whose generation ended, nor anything after a stream that only ran
    out of credit."""
    from lorad.daemon.batching import STREAM_GRACE_S, Step

    # a 10 ms one-token step; a prompt token adds 2 ms
    with _two_slabs(tiny_model, n_seq=3) as (here, there, cores):
        streamer = here.attach(512)
        prompt = Step(here.attach(512), list(range(5, 405)), [], prompt=True, client="other")
        short = Step(here.attach(512), list(range(5, 15)), [], prompt=True, client="other")

        def picked(*steps: Step) -> int:
            here._waiting = list(steps)
            assert here._pick() == list(steps)
            return here._room

        assert picked(prompt) == 512  # nothing has streamed
        here.join(prompt.seq)  # the long prompt's generation (its steps are prompt chunks)
        here.join(streamer)
        here.leave(streamer)  # out of credit: not the end of its generation
        assert picked(prompt) == 512
        here.join(streamer)
        here.leave(streamer, ended="streamer")  # the other's generation ended just now
        assert picked(prompt) == 2  # as beside a one-token step: 0.5 x 10 ms / 2 ms
        assert picked(short) == 512  # short prompts alone: as before
        here.join(streamer)
        here.leave(streamer, ended="other")  # the prompt's own client's: its next prompt
        assert picked(prompt) == 512  # is not held
        here.join(streamer)
        here.leave(streamer, ended="streamer")
        here.ended_at -= STREAM_GRACE_S  # the moment is over
        assert picked(prompt) == 512
        cores.streaming(there, 0.030)  # another slab streams with 30 ms steps, then ends
        cores.streaming(there, None)
        assert picked(prompt) == 7  # as beside its stream: 0.5 x 30 ms / 2 ms
        ended, at = cores._ended[id(there)]
        cores._ended[id(there)] = (ended, at - STREAM_GRACE_S)
        assert picked(prompt) == 512
        assert not cores._ended  # forgotten once over


def test_a_client_side_by_side_starts_at_once_beside_anothers_streams_once_an_interval(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside another client's streams, a short prompt past the share of a client that runs
    requests side by side is fed whole (its request starts at once) once per
    ``start_interval``; sooner, it is held to the share like a long prompt, so that a client
    that starts requests without pause (issue 24's HTTP flood: a 24-token prompt made the
    stream's 25 ms step 110-150 ms) cannot make every step of the others' streams several
    times as long. A client whose requests run one at a time starts each at once. Its clock
    is its own: another client starts at once meanwhile; prompts within the share are fed
    whole as far as it pays for them; beside its own streams only, a client's prompts are its
    own business, fed whole (and so beside another slab's streams: held, they made many steps
    of a slab, each a whole wait)."""
    import time

    from lorad.daemon import batching, llama
    from lorad.daemon.batching import Cores, SlabScheduler, Step

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    slab = llama.Slab(model, n_seq=6, n_ctx_seq=512, n_batch=512, n_threads=1)
    cores = Cores(prompt_share=0.5, start_interval=5.0)
    try:
        sched = SlabScheduler(slab, budget=512, cores=cores)
        for _ in range(3):  # a 10 ms one-token step, a prompt token adds 2 ms: the share is
            sched.cost.observe(1, 0.010)  # 2 tokens; a chunk's computation 0.5 ms: chunks
            sched.cost.prompt_samples.append(0.002)  # of 2 tokens beside a stream
            sched.cost.split_samples.append(0.0005)
            sched.cost.observe(8, 0.011)  # rows nearly free: the flooder's all fit its share
        monkeypatch.setattr(batching, "ROW_PRICE", 0.0)  # (priced as learnt)
        stream = Step(sched.attach(512), [5], [], client="streamer")
        seqs = [sched.attach(512) for _ in range(4)]

        def request(i: int, client: str, n: int = 20) -> Step:
            return Step(seqs[i], list(range(5, 5 + n)), [], prompt=True, client=client)

        def fed(*steps: Step) -> dict[Step, int]:
            sched._waiting = list(steps)
            batch = sched._pick()
            quotas = sched._prompt_quotas(batch, batch[0].key)
            return {s: quotas[id(s)] for s in steps if s.prompt}

        row = Step(sched.attach(512), [5], [], client="flooder")  # one of its requests
        first = request(0, "flooder")
        assert fed(stream, row, first) == {first: 20}  # its first request starts at once
        again = request(1, "flooder")
        assert fed(stream, row, again) == {again: 2}  # the next, beside its own: held
        assert fed(stream, again) == {again: 2}  # and for an interval after
        assert fed(stream, row, request(1, "flooder", n=2))  # within the share: whole
        assert not cores.may_start("flooder", time.monotonic())
        assert cores.may_start("flooder", time.monotonic() + 5.0)  # once its interval is up
        for _ in range(3):  # a client whose requests run one at a time: each at once
            one = request(2, "sequential")
            assert fed(stream, one) == {one: 20}
        other = request(2, "another")  # its own clock: whole; the held one gets what is left
        assert fed(stream, again, other) == {again: 1, other: 20}
        # two side by side in one step: one start an interval
        a, b = request(0, "third", 10), request(3, "third", 12)
        assert fed(stream, a, b) == {a: 10, b: 1}
        # short prompts within the share are fed whole only as far as the share pays for them
        x, y = request(2, "flooder", 2), request(3, "flooder", 2)
        assert fed(stream, x, y) == {x: 2, y: 1}
        # beside its own streams only, a client starts its requests at once, every time
        own = Step(stream.seq, [5], [], client="flooder")
        assert fed(own, again) == {again: 20}
        # a stream of another slab of the model does not hold it: a step of this slab is a
        # wait of a whole step for that stream, whatever its size (held, its prompts made
        # many: issue 24's credit flood, whose 8 contexts were a slab of their own)
        other_slab = SlabScheduler(slab, budget=512, cores=cores)
        cores.streaming(other_slab, 0.010)
        assert fed(own, again) == {again: 20}
        cores.streaming(other_slab, None)
    finally:
        slab.close()
        model.close()


def test_a_burst_of_new_clients_joins_the_streams_at_once(tiny_model: Path) -> None:
    """Short prompts beside other clients' streams are fed together up to the usual room
    (``SHORT_PROMPT`` tokens or the share) times the clients waiting for their first token per
    client streaming: 32 clients arriving together waited 4.1-6.0 s for the last first token,
    fed three a step (llama-server: 1.6-2.1 s). One new client, many prompts of one client, and
    prompts beside the streams of another slab only keep the usual room."""
    from lorad.daemon import llama
    from lorad.daemon.batching import SHORT_PROMPT, Cores, SlabScheduler, Step

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    slab = llama.Slab(model, n_seq=12, n_ctx_seq=256, n_batch=512, n_threads=1)
    try:
        cores = Cores(prompt_share=0.5)
        sched = SlabScheduler(slab, budget=512, cores=cores)
        for _ in range(3):  # a 10 ms step, a prompt token 2 ms: the share is 2 tokens
            sched.cost.observe(1, 0.010)
            sched.cost.observe(2, 0.011)
            sched.cost.prompt_samples.append(0.002)
        streams = [Step(sched.attach(256), [5], [], client=f"streamer{i}") for i in range(2)]
        seqs = [sched.attach(256) for _ in range(8)]
        n = SHORT_PROMPT // 2 + 1  # two of them do not fit the usual room together

        def prompt(i: int, client: str) -> Step:
            return Step(seqs[i], list(range(5, 5 + n)), [], prompt=True, client=client)

        def fed(*steps: Step) -> int:
            """How many of the prompts are fed whole."""
            sched._waiting = list(steps)
            batch = sched._pick()
            quotas = sched._prompt_quotas(batch, batch[0].key)
            return sum(quotas.get(id(s)) == n for s in steps if s.prompt)

        def newcomers(k: int) -> list[Step]:
            return [prompt(i, f"new{i}") for i in range(k)]

        assert fed(streams[0], *newcomers(8)) == 8  # 8 waiting per one streaming: all at once
        assert fed(*streams, *newcomers(4)) == 3  # 2 per streaming: twice the room
        assert fed(*streams, *newcomers(3)) == 2  # 1.5 times
        assert fed(*streams, *newcomers(2)) == 1  # as many as stream: the usual room
        assert fed(streams[0], *[prompt(i, "door") for i in range(8)]) == 1  # one client's
        other_slab = SlabScheduler(slab, budget=512, cores=cores)  # whose clients are not
        cores.streaming(other_slab, 0.010)  # counted here
        assert fed(*newcomers(8)) == 1
    finally:
        slab.close()
        model.close()


def test_what_a_prompt_may_add_beside_one_token_steps_of_other_clients(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside another client's streams, a prompt's share is of *their* step: its client's own
    rows in the step do not widen it, they take part of it (issue 24's HTTP flood: the door's
    generations made the stream's step wider, and its next prompts got half of that wider step
    on top). A short prompt of one token rides along as one more sequence would; the long ones
    beside it get what the share leaves once that row and their own computation are paid for,
    not the share as if chunks were free."""
    from lorad.daemon import batching, llama
    from lorad.daemon.batching import Cores, SlabScheduler, Step, StepCost

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    slab = llama.Slab(model, n_seq=4, n_ctx_seq=512, n_batch=512, n_threads=1)

    def costs(*steps_ms: float) -> StepCost:
        cost = StepCost()
        for _ in range(3):  # 1, 2 and 3 sequences; a prompt token 0.5 ms
            for n, ms in enumerate(steps_ms, 1):
                cost.observe(n, ms / 1000)
            cost.prompt_samples.append(0.0005)
            cost.split_samples.append(0.0015)  # a chunk's computation: 1.5 ms
        return cost

    monkeypatch.setattr(batching, "ROW_PRICE", 0.0)  # rows priced as learnt
    try:
        # rows that fit the door's share (a step of 1, 2, 3 sequences: 10, 12, 14 ms)
        sched = SlabScheduler(slab, budget=512, cost=costs(10, 12, 14),
                              cores=Cores(prompt_share=0.5))
        stream = Step(sched.attach(512), [5], [], client="streamer")
        own = Step(sched.attach(512), [5], [], client="door")
        long_ = Step(sched.attach(512), list(range(5, 105)), [], prompt=True, client="door")

        def room(*steps: Step) -> int:
            sched._waiting = list(steps)
            sched._pick()
            return sched._room

        # the share of the stream's 10 ms step (not of the 12 ms one with the door's row),
        # less what that row took of it: (5 - 2 - 1.5) ms / 0.5 ms
        assert room(stream, own, long_) == 3
        assert room(stream, long_) == 7  # (5 - 1.5) / 0.5
        mine = Step(stream.seq, [5], [], client="door")  # the door's rows only: its own step
        assert room(mine, own, long_) == 9  # (6 - 1.5) / 0.5
        # a short prompt of one token left (a cached one) rides along, a row more (20 - 10 ms
        # of the 5 allowed are gone): the long one gets one token, as dear as its own
        # computation (22 - 20 ms), not 5 / 0.5 - 1 tokens
        sched.cost = costs(10, 20, 22)
        cached = Step(own.seq, [5], [], prompt=True, client="other")
        assert room(stream, cached, long_) == 1 + 1
    finally:
        slab.close()
        model.close()


def test_a_client_gets_the_rows_its_share_of_anothers_step_pays_for(tiny_model: Path) -> None:
    """Beside another client's streams, a client with several sequences in a step (the HTTP
    door's generations, say) gets as many as add at most ``prompt_share`` to the others' step,
    at least one, in turns (the least recently served first): each is a row of their step,
    priced at least ``ROW_PRICE`` of a one-token step. Alone, or beside clients of one
    sequence each, every sequence is in every step."""
    from lorad.daemon import llama
    from lorad.daemon.batching import ROW_PRICE, Cores, SlabScheduler, Step

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    slab = llama.Slab(model, n_seq=6, n_ctx_seq=512, n_batch=512, n_threads=1)
    try:
        sched = SlabScheduler(slab, budget=512, cores=Cores(prompt_share=0.8))
        for _ in range(3):  # a row adds 2 ms to a 10 ms step, learnt; priced 3.5 ms at least:
            for n in (1, 2, 3, 4, 6):  # 2 fit the 8 ms share, 3 do not
                sched.cost.observe(n, 0.010 + 0.002 * (n - 1))
        assert ROW_PRICE == 0.35
        stream = Step(sched.attach(512), [5], [], client="streamer")
        door = [Step(sched.attach(512), [5], [], client="door") for _ in range(3)]
        prompt = Step(sched.attach(512), [5, 6, 7], [], prompt=True, client="door")

        def ids(*steps: Step) -> list[int]:
            sched._waiting = list(steps)
            batch = sched._pick()
            sched.steps += 1
            return sorted(s.seq.seq_id for s in batch)

        assert ids(stream, *door) == [0, 1, 2]  # the two nearest the stream
        # then the one left out, alone: with the other two, or the id between filled, three
        # rows more (10.5 ms)
        assert ids(stream, *door) == [0, 3]
        assert ids(stream, *door) == [0, 1, 2]
        assert ids(stream, *door) == [0, 3]
        assert sched.capped == 3
        assert ids(stream, *door, prompt) == [0, 4]  # the prompt takes its turn too
        assert ids(stream, *door, prompt) == [0, 1, 2]
        assert ids(*door, prompt) == [1, 2, 3, 4]  # alone: all of them
        ones = [Step(d.seq, [5], [], client=f"app{i}") for i, d in enumerate(door)]
        assert ids(stream, *ones) == [0, 1, 2, 3]  # clients of one sequence each: all
        # two clients of several: each gets its share of the other's step (the door's 14 ms
        # step pays for 11.2: the streamer's two, three rows more with the id between, 10.5
        # ms; and so the other way round)
        mine = Step(prompt.seq, [5], [], client="streamer")
        assert ids(stream, mine, *door) == [0, 1, 2, 3, 4]
        assert sched.capped == 4
        # a 5 ms share: the learnt 2 ms a row would let two in, the price lets one
        sched.cores.prompt_share = 0.5
        assert len(ids(stream, *door)) == 2
    finally:
        slab.close()
        model.close()


def test_a_start_interval_that_means_nothing_is_refused(tmp_path: Path) -> None:
    from lorad.daemon.config import load_config
    from lorad.daemon.errors import ConfigError

    path = tmp_path / "lorad.toml"
    for bad in ("-1", "1e9", "true", '"soon"'):
        path.write_text(f"[batching]\nstart_interval_s = {bad}\n")
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert err.value.details["field"] == "start_interval_s"
    path.write_text("[batching]\nstart_interval_s = 0\n")
    assert load_config(path).batching.start_interval_s == 0.0
    assert load_config(None).batching.start_interval_s == 5.0


def test_a_short_prompt_is_not_held_behind_a_long_one(tiny_model: Path) -> None:
    """A step's prompt room is shared out, the shortest prompt first: a short one whole when
    it fits (else in a later step), each long one at most an equal share of what is left; a
    10-token prompt beside a 400-token one is done in one step."""
    from lorad.daemon import llama
    from lorad.daemon.batching import SlabScheduler, Step

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    slab = llama.Slab(model, n_seq=2, n_ctx_seq=512, n_batch=512, n_threads=1)
    try:
        scheduler = SlabScheduler(slab, budget=512)
        long_seq, short_seq = scheduler.attach(512), scheduler.attach(512)
        for room, want in ((64, (54, 10)), (2, (2, 0)), (1, (1, 0)), (512, (400, 10))):
            long_ = Step(long_seq, list(range(5, 405)), [], prompt=True)
            short = Step(short_seq, list(range(5, 15)), [], prompt=True)
            scheduler._room = room
            quotas = scheduler._prompt_quotas([long_, short], long_.key)
            assert (quotas[id(long_)], quotas[id(short)]) == want, room
    finally:
        slab.close()
        model.close()


def test_a_draft_beside_other_sequences_costs_a_computation_of_its_own(
        tiny_model: Path) -> None:
    """llama.cpp puts the same number of tokens of each sequence into a ubatch (a KV pool per
    sequence), so one sequence's draft beside others' single tokens is a second graph
    computation: it costs what a step of that many tokens costs, not the marginal tokens of
    a wider one; such ragged steps are not timed as steps of their size but teach what a
    draft beside others costs."""
    from lorad.daemon import llama
    from lorad.daemon.batching import SlabScheduler

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    slab = llama.Slab(model, n_seq=4, n_ctx_seq=256, n_batch=256, n_threads=1)
    try:
        scheduler = SlabScheduler(slab, budget=256)
        for tokens, seconds in ((1, 0.020), (2, 0.024), (4, 0.030), (8, 0.040)):
            for _ in range(3):
                scheduler.cost.observe(tokens, seconds)
        scheduler.active = {0}
        assert scheduler.draft_cost(3) == 0.030 / 0.020  # alone: one step of 4 tokens
        assert scheduler.draft_whole(3) and not scheduler.draft_whole(4)  # 4 tokens, 5
        scheduler.active = {0, 1, 2, 3}
        assert scheduler.draft_cost(0) == 1.0
        # 4 + 4 tokens: a second computation as dear as a step of 4, times the prior of 1.5
        # until such steps are timed
        assert scheduler.draft_cost(4) == 1 + 1.5 * 0.030 / 0.030
        assert scheduler.draft_cost(4) > scheduler.cost.relative(4, 4)  # not 0.040 / 0.030
        assert scheduler.draft_whole(4) and not scheduler.draft_whole(5)
        # such steps teach what they really cost: 4 sequences and a 4-token draft took
        # 0.090 s, 0.060 s over the step, twice a step of 4 tokens (above the prior)
        for _ in range(3):
            scheduler.cost.observe_draft(4, 4, 0.090)
        assert scheduler.draft_cost(4) == pytest.approx(1 + 0.060 / 0.030)
        assert scheduler.cost.time(8) == 0.040  # the one-ubatch steps' table is not touched
    finally:
        slab.close()
        model.close()


async def test_a_models_steps_all_decode_on_one_thread_of_its_own(tiny_model: Path) -> None:
    """llama.cpp runs a step on an OpenMP team that belongs to the calling thread: every step
    of a model's slabs comes from the same thread (trio's changing threads made steps up to
    35 % slower on a daemon that had served a while), and it ends with the model."""
    import threading

    import trio

    from lorad.daemon import llama
    from lorad.daemon.batching import Cores, SlabScheduler, Step
    from lorad.daemon.sampling import Pick

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    cores = Cores()
    slabs_ = [llama.Slab(model, n_seq=1, n_ctx_seq=128, n_batch=64, n_threads=1)
              for _ in range(2)]
    threads: set[int] = set()

    class Where(Pick):
        """Greedy picks that note the thread they run on."""

        def __call__(self, slab: llama.Slab, i: int):
            threads.add(threading.get_ident())
            return super().__call__(slab, i)

    sampler = llama.Sampler(model, llama.SamplingParams(temperature=0))
    where = Where(sampler, plain_greedy=True)

    try:
        schedulers = [SlabScheduler(s, budget=64, cores=cores) for s in slabs_]
        async with trio.open_nursery() as nursery:
            for scheduler in schedulers:
                nursery.start_soon(scheduler.loop)
            for scheduler in schedulers:
                seq = scheduler.attach(128)
                await scheduler.run(Step(seq, [5, 6, 7], [], prompt=True, logits=where))
                for token in range(8, 12):
                    await scheduler.run(Step(seq, [token], [], logits=where))
                    await trio.to_thread.run_sync(lambda: None)  # trio's threads go on
            nursery.cancel_scope.cancel()
        assert len(threads) == 1 and threading.get_ident() not in threads
        [decode_thread] = [t for t in threading.enumerate() if t.ident in threads]
        assert decode_thread.name.startswith("lorad-decode")
        cores.close()
        decode_thread.join(5)
        assert not decode_thread.is_alive()
    finally:
        sampler.close()
        for s in slabs_:
            s.close()
        model.close()


async def test_the_engine_in_process_batches_picks_and_verifies(tiny_model: Path) -> None:
    """The scheduler and its sampling values without a daemon (issue 25's engine core): two
    sequences decoded in one batch give each the greedy tokens it gives alone (f32 KV), a
    draft of the greedy continuation is accepted whole, and a wrong draft is rolled back out
    of the sequence's cells."""
    from contextlib import asynccontextmanager

    import numpy as np
    import trio

    from lorad.daemon import llama
    from lorad.daemon.batching import SlabScheduler, Step
    from lorad.daemon.sampling import Pick, Verify

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    prompts = [model.tokenize(p, add_special=True, limit=64) for p in PROMPTS[:2]]
    sampler = llama.Sampler(model, llama.SamplingParams(temperature=0))
    pick = Pick(sampler, plain_greedy=True)

    async def greedy(scheduler: SlabScheduler, seqs: list, texts: list[list[int]], n: int
                     ) -> list[list[int]]:
        outs: list[list[int]] = [[] for _ in seqs]

        async def one(k: int) -> None:
            seq = seqs[k]
            scheduler.join(seq)
            produced = await scheduler.run(Step(seq, texts[k], [], prompt=True, logits=pick))
            for _ in range(n):
                token = produced[0][0]
                outs[k].append(token)
                produced = await scheduler.run(Step(seq, [token], [], logits=pick))
            scheduler.leave(seq)

        async with trio.open_nursery() as nursery:
            for k in range(len(seqs)):
                nursery.start_soon(one, k)
        return outs

    slabs = []

    @asynccontextmanager
    async def running(n_seq: int) -> AsyncIterator[SlabScheduler]:
        """A scheduler stepping a slab of ``n_seq`` sequences (exact: f32 KV)."""
        slabs.append(llama.Slab(model, n_seq=n_seq, n_ctx_seq=128, n_batch=64, n_threads=1,
                                kv_type="f32", flash_attn=False))
        scheduler = SlabScheduler(slabs[-1], budget=64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.loop)
            yield scheduler
            nursery.cancel_scope.cancel()

    try:
        alone = []
        for k in range(2):
            async with running(1) as scheduler:
                alone += await greedy(scheduler, [scheduler.attach(128)], [prompts[k]], 12)
        async with running(2) as scheduler:
            seqs = [scheduler.attach(128), scheduler.attach(128)]
            together = await greedy(scheduler, seqs, prompts, 12)
            assert together == alone

            # speculation: the greedy continuation as a draft is accepted whole; a wrong one
            # is cut back to the first token it got wrong
            seq, rng = seqs[0], np.random.default_rng(0)
            scheduler.join(seq)
            first = await scheduler.run(Step(seq, prompts[0], [], prompt=True, logits=pick))
            assert first[0][0] == alone[0][0]
            draft = alone[0][1:5]
            good = await scheduler.run(Step(seq, [alone[0][0], *draft], [], outputs=5,
                                            logits=Verify(seq, draft, None, None, rng)))
            assert [t for t, _ in good] == alone[0][1:6]
            held = len(seq.tokens)
            wrong = [(t + 1) % model.n_vocab for t in alone[0][6:9]]
            bad = await scheduler.run(Step(seq, [alone[0][5], *wrong], [], outputs=4,
                                           logits=Verify(seq, wrong, None, None, rng)))
            assert [t for t, _ in bad] == [alone[0][6]]  # no draft token accepted
            assert len(seq.tokens) == held + 1  # the rejected ones left the cells
            scheduler.leave(seq)
    finally:
        sampler.close()
        for slab in slabs:
            slab.close()
        model.close()


async def greedy_steps(scheduler, seq, text: list[int], n: int, pick,
                       started=None) -> list[int]:
    """``n`` greedy tokens of ``seq`` after the prompt ``text``, a step each, through the
    scheduler (``started`` is set once the first token is out)."""
    from lorad.daemon.batching import Step

    scheduler.join(seq)
    produced = await scheduler.run(Step(seq, text, [], prompt=True, logits=pick))
    out = []
    for _ in range(n):
        out.append(produced[0][0])
        if started is not None:
            started.set()
        produced = await scheduler.run(Step(seq, [out[-1]], [], logits=pick))
    scheduler.leave(seq)
    return out


@asynccontextmanager
async def scheduling(model, n_seq: int) -> AsyncIterator:
    """A running scheduler of an f32 slab of ``n_seq`` sequences of 128 cells on ``model``."""
    import trio

    from lorad.daemon import llama
    from lorad.daemon.batching import SlabScheduler

    slab = llama.Slab(model, n_seq=n_seq, n_ctx_seq=128, n_batch=64, n_threads=1,
                      kv_type="f32", flash_attn=False)
    scheduler = SlabScheduler(slab, budget=64)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.loop)
            yield scheduler
            nursery.cancel_scope.cancel()
    finally:
        slab.close()


@contextmanager
def greedy_model(path: Path) -> Iterator[tuple[Any, list[list[int]], Any]]:
    """The model at ``path``, ``PROMPTS`` tokenized, and a greedy pick."""
    from lorad.daemon import llama
    from lorad.daemon.sampling import Pick

    llama.init_backend()
    model = llama.Model(str(path))
    sampler = llama.Sampler(model, llama.SamplingParams(temperature=0))
    try:
        yield (model, [model.tokenize(p, add_special=True, limit=64) for p in PROMPTS],
               Pick(sampler, plain_greedy=True))
    finally:
        sampler.close()
        model.close()


async def streams_around_an_idle_one(model, texts: list[list[int]], pick, scheduler
                                     ) -> tuple[list, list[int], list[list[int]]]:
    """Each text's 10 greedy tokens alone (a slab of its own each), then on ``scheduler``: id 1
    runs a request and waits for its next (its cells hold its prompt and output) while ids 0,
    2, 3 and 4 stream together; each stream's output is its output alone. Returns the
    sequences, id 1's cached tokens and the outputs alone."""
    import trio

    alone = []
    for text in texts:
        async with scheduling(model, 1) as own:
            alone.append(await greedy_steps(own, own.attach(128), text, 10, pick))
    seqs = [scheduler.attach(128) for _ in range(5)]
    assert await greedy_steps(scheduler, seqs[1], texts[1], 10, pick) == alone[1]
    cached = list(seqs[1].tokens)
    got: dict[int, list[int]] = {}

    async def one(k: int, text: list[int]) -> None:
        got[k] = await greedy_steps(scheduler, seqs[k], text, 10, pick)

    async with trio.open_nursery() as nursery:
        for k, text in ((0, texts[0]), (2, texts[2]), (3, texts[3]), (4, texts[1])):
            nursery.start_soon(one, k, text)
    assert [got[0], got[2], got[3], got[4]] == [alone[0], alone[2], alone[3], alone[1]]
    return seqs, cached, alone


async def next_request_reuses_its_cache(scheduler, seq, text: list[int], alone: list[int],
                                        pick) -> None:
    """``seq``'s next request (its last prompt and 5 of its tokens) reuses its cache, all but
    the last token (whose logits the step needs), and goes on as alone."""
    from lorad.daemon.batching import Step

    again = Step(seq, text + alone[:5], [], prompt=True, logits=pick)
    scheduler.join(seq)
    produced = await scheduler.run(again)
    scheduler.leave(seq)
    assert again.reused == len(text) + 5 - 1
    assert produced[0][0] == alone[5]


async def test_a_step_is_one_run_of_sequence_ids_and_leaves_the_others_as_they_were(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fillers (``SlabScheduler._fillers``): a context between requests among streaming ones,
    and an odd number of streams, get a throwaway token so that the step is one run of
    consecutive sequence ids of a whole size (a gap split it in two computations, and 7 rows
    cost more than 8). The streams give their output alone, and the idle context's cache is as
    it was: its next request reuses it and gives its output alone. (Sequences too dear to
    move: cheap ones are put next to one another instead, the next test.)"""
    from lorad.daemon import batching

    monkeypatch.setattr(batching, "ROTATE_CELLS", 0)
    with greedy_model(tiny_model) as (model, texts, pick):
        async with scheduling(model, 8) as scheduler:
            # ids 0, 2, 3, 4 stream: a gap at 1
            seqs, cached, alone = await streams_around_an_idle_one(model, texts, pick,
                                                                   scheduler)
            # the gap, then a free id: 6 rows, a whole size; 4 outputs are whole: the fillers
            # have no output row (a product with the whole vocabulary each)
            assert scheduler._fillers([(seqs[k], [1], 1) for k in (0, 2, 3, 4)]) == \
                [(1, len(cached), False), (5, 0, False)]
            # 5 outputs (ids 0 and 2-5): the filler has a row, which makes them 6
            fifth = scheduler.attach(128)
            assert scheduler._fillers([(seqs[k], [1], 1) for k in (0, 2, 3, 4)] + [
                (fifth, [1], 1)]) == [(1, len(cached), True)]
            await scheduler.detach(fifth)
            assert seqs[1].tokens == cached
            await next_request_reuses_its_cache(scheduler, seqs[1], texts[1], alone[1], pick)


async def test_sequences_cheap_to_move_are_put_next_to_one_another(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``SlabScheduler._rotate``: streams at ids 0, 2, 3 and 4 around a context between
    requests at id 1, all with few cached tokens, exchange ids and cells so that a step is one
    run of ids with nothing to fill. Every stream gives its output alone, and the idle
    context's cache moved with it: its next request reuses it and gives its output alone. A
    sequence with ``ROTATE_CELLS`` cached tokens or more stays where it is (its gap is filled
    instead); one whose cells do not arrive fails (``CacheLost``)."""
    from lorad.daemon import batching
    from lorad.daemon.batching import Step
    from lorad.daemon.errors import CacheLost

    with greedy_model(tiny_model) as (model, texts, pick):
        async with scheduling(model, 8) as scheduler:
            seqs, cached, alone = await streams_around_an_idle_one(model, texts, pick,
                                                                   scheduler)
            assert 2 * len(cached) <= batching.ROTATE_CELLS
            assert scheduler.moves >= 1
            ids = sorted(seqs[k].seq_id for k in (0, 2, 3, 4))
            assert ids[-1] - ids[0] == 3  # one run: nothing between them to fill
            assert seqs[1].seq_id not in ids and seqs[1].tokens == cached
            # its cache, at its new id
            await next_request_reuses_its_cache(scheduler, seqs[1], texts[1], alone[1], pick)
            # too dear to move: the step fills the gap instead
            far = sorted((seqs[1], *(seqs[k] for k in (0, 2, 3, 4))), key=lambda q: q.seq_id)
            far = [far[0], far[-1]]
            assert far[1].seq_id - far[0].seq_id > 1
            moves = scheduler.moves
            monkeypatch.setattr(batching, "ROTATE_CELLS", min(len(q.tokens) for q in far))
            await scheduler._rotate([Step(q, [1], []) for q in far])
            assert scheduler.moves == moves
            monkeypatch.undo()
            await scheduler._rotate([Step(q, [1], []) for q in far])
            assert scheduler.moves == moves + 1
            assert abs(far[1].seq_id - far[0].seq_id) == 1
            # cells that did not arrive (llama.cpp refused them): the generation fails, it
            # does not go on from an empty cache
            apart = [seqs[k] for k in (0, 2, 3, 4)]
            await scheduler._exchange(apart[1], max(q.seq_id for q in apart) + 2)
            steps = [Step(q, [1], []) for q in apart]
            monkeypatch.setattr(scheduler.slab, "exchange", lambda *a: (False, False))
            scheduler._waiting = list(steps)
            kept = await scheduler._rotate(steps)
            scheduler._waiting = []
            lost = [s for s in steps if s not in kept]
            assert lost and all(isinstance(s.error, CacheLost) and s.done.is_set()
                                and not s.seq.tokens for s in lost)


async def test_prompt_tokens_that_ride_along_do_not_teach_a_prompt_tokens_cost(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prompt fed one token a step beside a stream (its own computation known to cost
    more than the share) joins the stream's computation: what those tokens add (often nothing
    measurable) is not what a prompt token costs in a chunk. Learnt as such, a median of 0 made
    the share unbounded, and a new request beside a long prompt took a step of 512 tokens
    (1.1 s on gemma 3 270M). Both give their output alone."""
    import itertools

    import trio

    from lorad.daemon import batching, llama
    from lorad.daemon.batching import SHORT_PROMPT, Step
    from lorad.daemon.sampling import Pick

    # every step waits for the stream's token: each one is the stream's, none of prompts alone
    monkeypatch.setattr(batching, "GATHER_S", 60.0)
    llama.init_backend()
    model = llama.Model(str(tiny_model))
    short = model.tokenize(PROMPTS[0], add_special=True, limit=64)
    long = model.tokenize(" ".join(PROMPTS * 2), add_special=True, limit=100)
    assert len(long) > SHORT_PROMPT
    sampler = llama.Sampler(model, llama.SamplingParams(temperature=0))
    pick = Pick(sampler, plain_greedy=True)
    try:
        alone = []
        for text, n in ((short, 24), (long, 4)):
            async with scheduling(model, 1) as scheduler:
                alone.append(await greedy_steps(scheduler, scheduler.attach(128), text, n, pick))
        async with scheduling(model, 2) as scheduler:
            scheduler.cost.split_samples.extend([10.0] * 3)  # a chunk of its own: too dear
            stream, prompt = scheduler.attach(128), scheduler.attach(128)
            learnt: list[int] = []
            fed: list[int] = []  # the prompt's cells after each of the stream's steps
            got: dict[str, list[int]] = {}

            async def streamer(nursery) -> None:
                scheduler.join(stream)
                produced = await scheduler.run(Step(stream, short, [], prompt=True,
                                                    logits=pick))
                out: list[int] = []
                for i in range(24):
                    out.append(produced[0][0])
                    if i == 1:  # it generates: the long prompt starts beside it
                        nursery.start_soon(prompter)
                    produced = await scheduler.run(Step(stream, [out[-1]], [], logits=pick))
                    learnt.append(len(scheduler.cost.prompt_samples))
                    fed.append(len(prompt.tokens))
                scheduler.leave(stream)
                got["stream"] = out

            async def prompter() -> None:
                got["prompt"] = await greedy_steps(scheduler, prompt, long, 4, pick)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(streamer, nursery)
            assert got == {"stream": alone[0], "prompt": alone[1]}
            steps = [b - a for a, b in itertools.pairwise(fed)]
            assert max(steps) == 1 and sum(steps) >= 15, fed  # it rode along, a token a step
            assert learnt == [0] * 24, learnt
    finally:
        sampler.close()
        model.close()

async def test_a_long_prompt_is_moved_next_to_the_streams(tiny_model: Path) -> None:
    """``SlabScheduler._place``: a long prompt that starts while a stream generates, two ids
    away from it over a context between requests, exchanges its id and cells with that
    context's: the stream and the prompt give their output alone, and the idle context's
    cache moved with it (its next request reuses it and gives its output alone). Two long
    prompts that start together both go next to the stream."""

    import trio

    from lorad.daemon import llama
    from lorad.daemon.batching import SHORT_PROMPT
    from lorad.daemon.sampling import Pick

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    short = [model.tokenize(p, add_special=True, limit=64) for p in PROMPTS]
    long = model.tokenize(" ".join(PROMPTS * 2), add_special=True, limit=100)
    assert len(long) > SHORT_PROMPT
    sampler = llama.Sampler(model, llama.SamplingParams(temperature=0))
    pick = Pick(sampler, plain_greedy=True)

    def stream(scheduler, seq, text: list[int], n: int, started: trio.Event | None = None):
        return greedy_steps(scheduler, seq, text, n, pick, started)

    def running(n_seq: int):
        return scheduling(model, n_seq)

    try:
        alone = []
        for text, n in ((short[0], 20), (long, 8), (short[1], 10)):
            async with running(1) as scheduler:
                alone.append(await stream(scheduler, scheduler.attach(128), text, n))
        async with running(8) as scheduler:
            seqs = [scheduler.attach(128) for _ in range(3)]
            idle = await stream(scheduler, seqs[1], short[1], 10)  # between requests, id 1
            assert idle == alone[2]
            cached = list(seqs[1].tokens)
            got: dict[int, list[int]] = {}
            streaming = trio.Event()

            async def one(k: int, text: list[int], n: int) -> None:
                got[k] = await stream(scheduler, seqs[k], text, n,
                                      streaming if k == 0 else None)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0, short[0], 20)
                await streaming.wait()  # the stream generates: the long prompt starts beside it
                nursery.start_soon(one, 2, long, 8)
            assert got == {0: alone[0], 2: alone[1]}
            assert scheduler.moves == 1
            assert (seqs[2].seq_id, seqs[1].seq_id) == (1, 2)
            assert sorted(scheduler.sequences) == [0, 1, 2]
            assert scheduler.sequences[2] is seqs[1] and seqs[1].tokens == cached
            # its cache, at its new id
            await next_request_reuses_its_cache(scheduler, seqs[1], short[1], alone[2], pick)

            # ids 1 and 2 between requests, two long prompts at 3 and 4 start together
            seqs += [scheduler.attach(128) for _ in range(2)]
            assert [q.seq_id for q in seqs] == [0, 2, 1, 3, 4]
            streaming = trio.Event()
            got.clear()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0, short[0], 20)
                await streaming.wait()
                nursery.start_soon(one, 3, long, 8)
                nursery.start_soon(one, 4, long, 8)
            assert got == {0: alone[0], 3: alone[1], 4: alone[1]}
            assert scheduler.moves == 3
            assert {seqs[3].seq_id, seqs[4].seq_id} == {1, 2}
    finally:
        sampler.close()
        model.close()


async def test_the_engine_core_steps_a_generation_and_returns_its_outputs(
        tiny_model: Path) -> None:
    """The engine core's API without a daemon (issue 25): a :class:`Generation` asked for its
    steps gives, as return values, one token a step, the greedy tokens of plain steps; it ends
    with ``length`` at ``max_tokens``; with ``prompt_lookup`` a repeating text is drafted and
    verified, several tokens a step, and its tokens are those without drafting; a cancel ends
    it at the next step, decoding nothing more."""
    from contextlib import asynccontextmanager

    import trio

    from lorad.daemon import llama
    from lorad.daemon.batching import SlabScheduler, Step
    from lorad.daemon.generation import Generation
    from lorad.daemon.ngrams import Memory
    from lorad.daemon.sampling import Pick
    from lorad.daemon.speculative import Drafter

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    prompt = model.tokenize(PROMPTS[0], add_special=True, limit=64)
    sampler = llama.Sampler(model, llama.SamplingParams(temperature=0))
    slab = llama.Slab(model, n_seq=1, n_ctx_seq=256, n_batch=64, n_threads=1, kv_type="f32",
                      flash_attn=False)

    @asynccontextmanager
    async def running() -> AsyncIterator[SlabScheduler]:
        scheduler = SlabScheduler(slab, budget=64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.loop)
            yield scheduler
            nursery.cancel_scope.cancel()

    async def steps(scheduler: SlabScheduler, gen: Generation
                    ) -> tuple[list[list[int]], str]:
        outputs = []
        while True:
            output = await scheduler.next(gen)
            outputs.append([t for t, _ in output.tokens])
            if output.end is not None:
                return outputs, output.end

    try:
        async with running() as scheduler:
            seq = scheduler.attach(256)
            pick = Pick(sampler, plain_greedy=True)
            produced = await scheduler.run(Step(seq, prompt, [], prompt=True, logits=pick))
            plain = [produced[0][0]]
            for _ in range(39):
                produced = await scheduler.run(Step(seq, [plain[-1]], [], logits=pick))
                plain.append(produced[0][0])

            gen = Generation(seq, prompt, [], sampler, 40, plain_greedy=True)
            outputs, end = await steps(scheduler, gen)
            assert end == "length" and all(len(o) == 1 for o in outputs)
            assert [t for o in outputs for t in o] == plain
            assert gen.reused == len(prompt) - 1  # the same prompt: its cache reused

            # the request sent again drafts from the context's memory of its output: the
            # drafts are the greedy tokens, accepted, several a step, and the output is the same
            memory = Memory()
            memory.add(prompt, plain)
            drafted = Generation(seq, prompt, [], sampler, 40, plain_greedy=True,
                                 drafter=Drafter("prompt_lookup", 8, adaptive=False),
                                 memory=memory)
            outputs, end = await steps(scheduler, drafted)
            assert end == "length"
            assert [t for o in outputs for t in o] == plain
            assert drafted.drafter.accepted == drafted.drafter.drafted > 0
            assert max(len(o) for o in outputs) == 9 and len(outputs) < 10

            cancelled = False
            gen = Generation(seq, prompt, [], sampler, 40, plain_greedy=True,
                             should_stop=lambda: cancelled)
            first = await scheduler.next(gen)
            assert first.end is None and [t for t, _ in first.tokens] == plain[:1]
            cancelled = True
            cached = len(seq.tokens)
            assert (await scheduler.next(gen)).end == "cancelled"
            assert len(seq.tokens) == cached  # nothing decoded after the cancel
    finally:
        sampler.close()
        slab.close()
        model.close()


async def test_a_slab_of_one_sequence_is_kept_idle_for_the_next_context_of_its_kind(
        tiny_model: Path, autojump_clock) -> None:
    """``keep_idle``: the emptied slab of one sequence is taken by the next context of its
    kind (no KV cache allocated and cleared again), and freed once its time is up; a slab of
    more sequences is freed with its last context (an idle slab never holds more than one
    context's cache)."""
    import trio

    from lorad.daemon import llama
    from lorad.daemon.batching import Batcher
    from lorad.daemon.budget import MemoryBudget

    llama.init_backend()
    model = llama.Model(str(tiny_model))
    memory = MemoryBudget()
    kind = {"n_ctx": 128, "n_batch": 64, "n_threads": 1, "kv_type": "f32", "flash_attn": False}
    try:
        async with trio.open_nursery() as nursery:
            batcher = Batcher(model, sequences=4, budget=64, unified=False, nursery=nursery,
                              memory=memory, keep_idle=5.0)
            scheduler, seq = await batcher.attach(**kind)
            await batcher.detach(scheduler, seq)
            [slab] = batcher.info()
            assert slab["idle"] and slab["used"] == 0
            assert [h.get("idle") for h in memory.info()["held"]] == [True]
            await trio.sleep(4)
            again, seq = await batcher.attach(**kind)
            assert again is scheduler and not batcher.info()[0]["idle"]
            assert [h.get("idle") for h in memory.info()["held"]] == [None]
            await trio.sleep(2)  # the first idle time is up: a slab in use stays
            assert batcher.info()[0]["used"] == 1
            await batcher.detach(again, seq)
            await trio.sleep(6)
            assert batcher.info() == [] and memory.in_use == 0 and again.closed

            # two sequences: freed with the last one
            (one, a), (two, b) = [await batcher.attach(**kind) for _ in range(2)]
            assert one is two and one.slab.n_seq == 2
            await batcher.detach(one, a)
            await batcher.detach(two, b)
            assert batcher.info() == [] and memory.in_use == 0
            batcher.close()
            nursery.cancel_scope.cancel()
    finally:
        model.close()
