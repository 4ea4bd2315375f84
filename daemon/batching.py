"""Continuous batching: contexts of one model are sequences of shared llama contexts (slabs),
and one scheduler per slab decodes the work of all of them in one ``llama_decode`` per step.

A context actor asks the scheduler for its generation's next step (:meth:`SlabScheduler.next`,
:mod:`.generation`): the scheduler makes it a :class:`Step` (the prompt, the next token, or a
token and its draft) and returns what it produced. Each step the scheduler picks one adapter
stack (llama.cpp applies adapters to a whole batch), takes every waiting decode of that stack,
fills the rest of the token budget with chunks of that stack's waiting prompts, decodes them in
its decode thread, and samples or verifies each finished step (its ``logits`` value) in that
same thread on the logits in place. Stacks with waiting work are served in rotation, in turns
of ``QUANTUM`` steps, so none starves: with k stacks waiting, each waits at most
``(k - 1) * QUANTUM`` steps. Only the scheduler's thread calls llama.cpp on a slab.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import llama
from .affinity import Team
from .budget import KvShape, MemoryBudget, Reservation
from .errors import CacheLost, EngineStopped, SequenceClosing
from .generation import Generation, StackPairs, StepOutput, start_drafting
from .ingress import Ingress
from .logs import log
from .sampling import Pick, Verify
from .workers import BUILD, DECODE, Pool

GATHER_S = 0.02
"""How long a batch waits at most for a generating sequence's next step."""
SHORT_PROMPT = 64
"""A prompt with at most this many tokens left is fed whole even while other contexts stream
(a new request starts at once); longer ones are held to ``prompt_share``. Beside another
client's streams, the short prompts past the share of a client that runs requests side by side
are fed whole at most once per ``Cores.start_interval`` seconds (see :meth:`Cores.may_start`)."""
SPLIT_TOKENS = 8
"""Steps whose prompt chunks of at most this many tokens made a computation of their own are
timed as what such a computation costs (its fixed part, about what the share decides on)."""
MOVE_CELLS = 4096
"""Most cached tokens (of both sequences together) moved to put a long prompt next to the
sequences that generate (:meth:`SlabScheduler._place`): a move copies them between two steps."""
ROTATE_CELLS = 128
"""Most cached tokens (of both sequences together) exchanged to put a sequence of a step next
to the others (:meth:`SlabScheduler._rotate`): gemma 3 270M copied 60 in 0.5 ms, 600 in 5 ms
(Intel Xeon, 2 cores), while each id filled between them adds 1.5-2.5 ms to the step."""
ROW_PRICE = 0.35
"""The least a row of another client adds to a step, relative to a one-token step, where
:meth:`SlabScheduler._share_rows` weighs it: learnt step costs put a row at 1 ms beside a
28 ms step in a first HTTP flood (a one-token step's median then came from the flood's most
contended steps), and the door had two or three rows beside the stream where a row costs
4-5 ms (27 against 22 ms quiet, gemma 3 270M, 2 cores)."""
QUANTUM = 4
"""Steps a stack is served in a row while others wait: changing the adapters of a llama
context makes its next decode re-reserve the graph (6-9 ms on gemma 270M here, a fifth of a
step), so turns of a few steps amortise it; the wait of the others stays a few steps."""
TIMELINE_STEPS = 256
"""How many of a slab's last steps ``status()["batching"][i]["timeline"]`` shows."""
STREAM_GRACE_S = 0.25
"""A slab where a generation ended this recently holds a step of other clients' long prompts
as if that generation still streamed (another slab's ended streams hold every prompt): a
client that streams request after request sends its next one at once, and a step of prompts
alone taken meanwhile (512 tokens of another client's long prompt: 1.3-1.7 s on gemma 3 270M,
2 cores) was its next first token's wait (``bench/noisy.py``'s prompts flood)."""


@dataclass(eq=False)
class Step:
    """Work for one sequence: ``tokens`` decoded under ``stack``, then ``logits`` run on the
    slab and the batch index of its first row (in the decode thread; its result is the
    step's)."""

    seq: llama.Sequence
    tokens: list[int]
    stack: StackPairs
    prompt: bool = False
    """A prompt: the longest prefix cached under the same stacks is reused, the rest is decoded
    in chunks of at most ``chunk`` tokens, and only its last token gets logits."""
    outputs: int = 1
    """How many of the last tokens get logits (not for prompts)."""
    logits: Pick | Verify | None = None
    """What is done with the step's rows: sample the next token, or verify a draft."""
    clear: bool = False
    """Housekeeping (no tokens): the sequence's cells are freed."""
    should_stop: Callable[[], bool] = lambda: False
    chunk: int = 1 << 30
    client: object = None
    """Whose work it is (the context's creator; None: the sequence's own): the scheduler
    shares out what new requests may add to the steps of other clients' streams."""
    pre_stack: StackPairs | None = None
    """For a prompt: the stack of its tokens before ``split`` (an activated LoRA's prompt is
    computed without it up to its invocation); ``stack`` applies from ``split`` on."""
    split: int = 0
    # -- the scheduler's state
    capped: bool = False
    """Left out of a step at least once: its client had as many sequences in it as its share
    of the other clients' step pays for (:meth:`SlabScheduler._share_rows`)."""
    held: bool = False
    """A short prompt held to the share at least once (its client started another too
    recently beside others' streams)."""
    key: tuple[tuple[int, float], ...] = ()
    """The stack of the next tokens to decode (what the scheduler batches by)."""
    reused: int = 0
    pending: list[int] = field(default_factory=list)
    position: int = 0
    """The prompt index of ``pending[0]``."""
    started: bool = False
    stopped: bool = False
    finished: bool = False
    """Set in the decode thread; ``done`` is set from trio's thread after it."""
    result: Any = None
    error: Exception | None = None
    done: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.full_key = llama.stack_key(self.stack)
        self.pre_key = (llama.stack_key(self.pre_stack) if self.pre_stack is not None
                        else self.full_key)
        if not self.prompt or self.pre_stack is None:
            self.split = 0
        self._target(0)

    @property
    def owner(self) -> object:
        """The client the step's work is counted to (a context of none: its own, by the
        sequence's ``id``, which a client's clock in :class:`Cores` then does not keep
        alive)."""
        return self.client if self.client is not None else id(self.seq)

    def want(self, i: int) -> tuple[tuple[int, float], ...]:
        """The stack prompt token ``i`` must be computed under."""
        return self.pre_key if i < self.split else self.full_key

    def _target(self, position: int) -> None:
        self.position = position
        self.key = self.want(position)
        self.pairs = self.pre_stack if position < self.split else self.stack


def to_fill(low: int, high: int, n: int, at: int) -> int:
    """The ids a step of one token each would fill (:meth:`SlabScheduler._fillers`) if a
    sequence at ``at`` joined ``n`` others whose ids run from ``low`` to ``high``."""
    return max(high, at) - min(low, at) - n


def whole(tokens: int) -> bool:
    """Whether a step of ``tokens`` tokens is on the grid drafts are sized to: a power of two
    or three times one (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, ...). Step costs are not
    smooth in the size, since matrix kernels work on blocks of tokens: measured on the AMD EPYC
    with repacked Q4_K weights, a step of an odd number of tokens costs about a one-token step
    more than one of the even number above it (25 tokens 150 ms, 24 132 ms, 26 144 ms), and a
    cost interpolated between sizes timed at odd sizes missed the cheaper ones. Sizes on the
    grid leave few blocks part-used, and as few sizes they are each timed often."""
    while tokens > 1 and tokens % 2 == 0:
        tokens //= 2
    return tokens in (1, 3)


class StepCost:
    """What a decoding step costs, learnt online from the engine's own steps whose tokens all
    get logits: the median time of the last steps of each size (robust to the spikes a shared
    machine adds). A size seen costs its own median; between sizes, the cost is interpolated
    between those seen on the grid (:func:`whole`; any seen while none is): a size off it, as a
    request's last step, is dearer than its neighbours and would make those above it look dear
    too. Beyond the largest size, each further token is assumed to cost ``PRIOR`` of a one-token
    step, or the slope of the two largest sizes when that is lower: optimistic where nothing is
    known, so that a deep draft is tried when its acceptance would pay for it, and its real cost
    learnt from then on (another client's rows beside a stream are priced the other way round:
    :meth:`SlabScheduler._share_rows`). (Costs are not linear in the size: on CPUs a step of 2
    or 3 tokens may cost nearly twice one of 1, while further tokens cost a third of it
    each.)"""

    PRIOR = 0.35
    KEEP = 15
    SPLIT_PRIOR = 0.5
    """What a second computation of a step adds, before one was timed, relative to a
    one-token step (measured 0.63 on gemma 3 270M, Intel Xeon, 2 cores)."""
    DRAFT_PRIOR = 1.5
    """What a draft beside other sequences costs over a step of its size before any was timed
    (measured 1.2-3.7 on 2 cores: the prior is the cheap side, never below it)."""

    def __init__(self) -> None:
        self.samples: dict[int, deque[float]] = {}
        self._medians: dict[int, float] = {}
        self._points: list[tuple[int, float]] | None = None  # interpolated, until a new sample
        self.prompt_samples: deque[float] = deque(maxlen=self.KEEP)
        """What one prompt token added to recent steps that had some (seconds)."""
        self.split_samples: deque[float] = deque(maxlen=self.KEEP)
        """What recent steps' prompt chunks of more than one token added beside one-token
        decodes, with a KV pool per sequence (seconds): a computation of their own."""
        self.draft_samples: deque[float] = deque(maxlen=self.KEEP)
        """What the draft tokens of recent steps with other sequences added, over what a
        step of that many tokens costs (:meth:`draft_time`)."""

    def observe(self, tokens: int, seconds: float) -> None:
        self.samples.setdefault(tokens, deque(maxlen=self.KEEP)).append(seconds)
        self._points = None

    def time(self, tokens: int) -> float:
        """The expected time of a step of ``tokens`` tokens (any unit)."""
        if self._points is None:  # a draft's depth asks this for every depth it weighs
            self._medians = {x: statistics.median(ys) for x, ys in self.samples.items()}
            seen = sorted(self._medians.items())
            self._points = [(x, y) for x, y in seen if whole(x)] or seen
        if (own := self._medians.get(tokens)) is not None:
            return own
        points = self._points
        if not points:
            return 1 + self.PRIOR * (tokens - 1)
        x0, y0 = points[0]
        unit = y0 / (1 + self.PRIOR * (x0 - 1))  # a one-token step, by the prior's shape
        if tokens <= x0:
            return unit * (1 + self.PRIOR * (tokens - 1))
        for (xa, ya), (xb, yb) in itertools.pairwise(points):
            if tokens <= xb:
                return ya + (yb - ya) * (tokens - xa) / (xb - xa)
        xl, yl = points[-1]
        slope = self.PRIOR * unit
        if len(points) > 1:
            xp, yp = points[-2]
            slope = min(slope, max((yl - yp) / (xl - xp), 0.0))
        return yl + slope * (tokens - xl)

    def observe_prompt(self, decodes: int, prompt_tokens: int, seconds: float) -> None:
        """A step of ``decodes`` tokens with logits and ``prompt_tokens`` without took
        ``seconds``: what a prompt token adds is what the step took beyond the decodes; for
        prompts alone, what its tokens after the first took beyond a one-token step, which the
        first is (a prompt of one token left, as one mostly cached, teaches nothing: counted as
        one token more, such steps made the median 0 after a client's cached prompts, and the
        share unbounded)."""
        counted = prompt_tokens if decodes else prompt_tokens - 1
        if self.samples and counted > 0:
            extra = seconds - self.time(max(1, decodes))
            self.prompt_samples.append(max(extra, 0.0) / counted)

    def observe_split(self, decodes: int, seconds: float) -> None:
        """A step of ``decodes`` one-token decodes and prompt chunks that made a computation
        of their own took ``seconds``."""
        if self.samples:
            self.split_samples.append(max(seconds - self.time(max(1, decodes)), 0.0))

    def split_time(self) -> float:
        """What a computation of prompt chunks beside one-token decodes adds to their step:
        the median of recent such steps, else ``SPLIT_PRIOR`` of a one-token step."""
        if self.split_samples and self.samples:
            return statistics.median(self.split_samples)
        return self.SPLIT_PRIOR * self.time(1)

    def observe_draft(self, base: int, extra: int, seconds: float) -> None:
        """A step of ``base`` sequences, ``extra`` draft tokens among them, took ``seconds``."""
        if self.samples and extra > 0:
            added = max(seconds - self.time(base), 0.0)
            self.draft_samples.append(added / self.time(extra))

    def draft_time(self, extra: int) -> float:
        """What ``extra`` draft tokens add to a step of other sequences: a computation of
        their own (see :meth:`SlabScheduler.draft_cost`), as dear as a step of that many
        tokens times what recent such steps showed (at least that: the output buffer grows
        and the rows of a draft are each a product with the whole vocabulary)."""
        ratio = (statistics.median(self.draft_samples) if self.draft_samples
                 else self.DRAFT_PRIOR)
        return self.time(extra) * max(ratio, 1.0)

    def prompt_token(self) -> float:
        """What a prompt token adds to a step (in :meth:`time`'s unit): the median of recent
        steps, else ``PRIOR`` of a one-token step (it may be learnt only from prompts that
        ran, so the prior is the expensive side of what was measured: 2.2 ms a token against
        14 ms a step on gemma 3 270M on the AMD EPYC, 0.16 of it)."""
        if self.prompt_samples and self.samples:
            return max(statistics.median(self.prompt_samples), 1e-6)
        return self.PRIOR * self.time(1)

    def table(self) -> list[list[float]]:
        """``[[tokens, median ms], ...]`` for each step size seen, smallest first."""
        return [[x, round(statistics.median(ys) * 1000, 3)]
                for x, ys in sorted(self.samples.items())]

    def relative(self, extra: int, base: int) -> float:
        """The time of a step with ``extra`` more tokens than ``base``, relative to it."""
        return self.time(base + extra) / self.time(base)


class Cores:
    """What the slabs of one model share: the cores (one slab decodes at a time: two at once
    would only slow each other down) and which of them have streaming contexts, with what
    their steps take (a step of one slab is a wait for the streams of the others); and, by
    client, when one last ran requests side by side and had a short prompt fed whole past the
    share beside another's streams (:meth:`may_start`)."""

    def __init__(self, prompt_share: float = 0.5, ingress: Ingress | None = None,
                 team: Team | None = None, start_interval: float = 5.0) -> None:
        self.lock = trio.Lock()
        self.prompt_share = prompt_share
        self.start_interval = start_interval
        """How often a client's short prompt may be fed whole past the share beside another
        client's streams (seconds; see :meth:`may_start`)."""
        self._starts: dict[object, float] = {}
        self._parallel: dict[object, float] = {}
        self.ingress = ingress if ingress is not None else Ingress()
        """Told when a step decodes: the doors then hold back new work (the daemon's)."""
        self.thread = Pool("decode", 1, own=True)
        """Where the model's steps decode, one after the other: always the same thread, so
        llama.cpp's OpenMP team is always the same one (see :mod:`lorad.daemon.workers`)."""
        self.team = team if team is not None else Team(enabled=False)
        """Where that team runs (:mod:`lorad.daemon.affinity`)."""
        self._streams: dict[int, float] = {}
        self._ended: dict[int, tuple[float, float]] = {}
        """Slabs whose streams ended: their step's seconds and when (``time.monotonic``)."""

    def close(self) -> None:
        """The decode thread ends once its step is done."""
        self.thread.close()

    def streaming(self, scheduler: SlabScheduler, step_seconds: float | None) -> None:
        """``scheduler``'s contexts stream with steps of ``step_seconds`` (None: they do not;
        for ``STREAM_GRACE_S`` they count as streaming still)."""
        if step_seconds is None:
            last = self._streams.pop(id(scheduler), None)
            if last is not None:
                self._ended[id(scheduler)] = (last, time.monotonic())
        else:
            self._streams[id(scheduler)] = step_seconds
            self._ended.pop(id(scheduler), None)

    def may_start(self, client: object, now: float) -> bool:
        """Whether ``client`` may have a short prompt fed whole past the share beside another
        client's streams now. A client whose requests run one at a time always may: its new
        request starts at once (4 clients asking short questions one after another lost 15 %
        of their throughput when each was held). A client that has run requests side by side
        within ``start_interval`` (a flood of them: every step of the others' streams carried
        one of its prompts) may once per ``start_interval``; sooner, its prompts are held to
        the share (each such start is a step of the others' streams several times as long: a
        24-token prompt made a 25 ms step of gemma 3 270M 110-150 ms on 2 cores)."""
        parallel = self._parallel.get(client)
        if parallel is None or now - parallel >= self.start_interval:
            return True
        last = self._starts.get(client)
        return last is None or now - last >= self.start_interval

    def started(self, client: object, now: float) -> None:
        """``client``'s short prompt was fed whole past the share beside others' streams."""
        self._starts = self._remember(self._starts, client, now)

    def side_by_side(self, client: object, now: float) -> None:
        """``client`` has more than one request on the model's steps now."""
        self._parallel = self._remember(self._parallel, client, now)

    def _remember(self, times: dict[object, float], client: object, now: float
                  ) -> dict[object, float]:
        if len(times) >= 256:  # clients come and go: forget those whose time is up
            times = {c: t for c, t in times.items() if now - t < self.start_interval}
        times[client] = now
        return times

    def stream_seconds(self, scheduler: SlabScheduler) -> float | None:
        """The longest step of another slab's streams, those that ended within
        ``STREAM_GRACE_S`` included (None: no other slab streams)."""
        now = time.monotonic()
        self._ended = {k: e for k, e in self._ended.items() if now - e[1] < STREAM_GRACE_S}
        others = [t for k, t in self._streams.items() if k != id(scheduler)]
        others += [t for k, (t, _) in self._ended.items() if k != id(scheduler)]
        return max(others) if others else None


class SlabScheduler:
    """Decodes the steps of one slab's sequences, a batch per step (see the module)."""

    def __init__(self, slab: llama.Slab, budget: int, cost: StepCost | None = None,
                 cores: Cores | None = None) -> None:
        self.slab = slab
        self.cores = cores if cores is not None else Cores()
        """Shared by the slabs of one model: one decodes at a time, and each knows whether
        another's contexts stream (see :class:`Cores`)."""
        self.budget = max(1, min(budget, slab.n_batch))
        self._room = self.budget
        """Prompt tokens the step being decoded may take (:meth:`_pick` decides)."""
        self._shape = (0, 0)
        """The decode and prompt tokens of the last step."""
        self._split = False
        """Whether the last step's prompt chunks made a computation of their own beside its
        one-token decodes (see :meth:`_prompt_room`)."""
        self._rode = False
        """Whether the last step's prompt tokens rode along, one a sequence beside one-token
        decodes (their cost is not a prompt token's: :meth:`StepCost.observe_prompt`)."""
        self._held: set[int] = set()
        """Short prompts (by ``id``) held to the share in the step being decoded: their client
        started another too recently beside others' streams (:meth:`Cores.may_start`)."""
        self._starts: dict[int, object] = {}
        """Short prompts (by ``id``) of the step being decoded that are fed whole past the
        share beside another client's streams, with their client (counted as they are fed)."""
        self._within = 0
        """The prompt tokens of short prompts fed whole that the share pays for in the step
        being decoded (:meth:`_prompt_room`)."""
        self.free_ids = list(range(slab.n_seq))
        self.sequences: dict[int, llama.Sequence] = {}
        self._waiting: list[Step] = []
        self._order: list[tuple[tuple[int, float], ...]] = []  # stacks, in rotation order
        self._serving: tuple[tuple[int, float], ...] | None = None
        self._turn_left = 0
        self._wake = trio.Event()
        self.active: set[int] = set()
        """Sequences in the middle of a generation: their next step is coming."""
        self.ended_at = -math.inf
        """When a generation last ended (``time.monotonic``): for ``STREAM_GRACE_S`` after, a
        step of long prompts of other clients is held as if it still streamed
        (:meth:`_prompt_room`)."""
        self.ended_by: object = None
        """The client of that generation (its own next prompt is not held)."""
        self.cost = cost if cost is not None else StepCost()
        """What its steps cost (shared by the slabs of a kind: it outlives a slab)."""
        self.steps = 0
        self.tokens = 0
        self.timeline: deque[tuple[float, float, int]] = deque(maxlen=TIMELINE_STEPS)
        """The last steps: when each began (``time.monotonic``, one clock for every process
        of the machine), what its decode took (seconds) and its tokens (``status``)."""
        self.stack_switches = 0
        self.moves = 0
        """Long prompts moved next to the generating sequences (:meth:`_place`)."""
        self.starts = 0
        """Short prompts fed whole past the share beside another client's streams."""
        self.capped = 0
        """Steps left out of a step beside other clients' streams (:meth:`_share_rows`)."""
        self._served: dict[int, int] = {}
        """The step each sequence last had work in (by id): a client's sequences beyond its
        share take turns, the least recently served first."""
        self.held = 0
        """Short prompts held to the share: their client had started another too recently
        beside others' streams (:meth:`Cores.may_start`)."""
        self._widest = (0, slab.n_seq)  # the most tokens and outputs of a step so far
        self.widened = False
        """Whether the last step had more tokens or outputs than any before it on this slab:
        it touched memory of llama.cpp's buffers for the first time (the output buffer is even
        allocated anew), ~15 % of its time for a 64-token step, so it is not timed."""
        self.closed = False
        self._stepping = trio.Lock()
        """Held while a step decodes (and while the slab is replaced by a wider one)."""
        self.reservation: Reservation | None = None
        """The slab's KV cache in the memory budget (released with the slab)."""

    # -- sequences ------------------------------------------------------------------------------
    def attach(self, n_ctx: int) -> llama.Sequence:
        # The lowest free id: ids stay compact, so that a batch is one run of consecutive ids
        # as often as possible (see _decode).
        seq_id = min(self.free_ids)
        self.free_ids.remove(seq_id)
        seq = llama.Sequence(self.slab, seq_id, n_ctx)
        self.sequences[seq.seq_id] = seq
        return seq

    async def widen(self, slab: llama.Slab) -> None:
        """Move every sequence into ``slab`` (wider, of the same kind) between two steps and
        free the old slab: the sequences keep their ids and cached tokens."""
        async with self._stepping:
            old = self.slab

            def move() -> None:
                old.move_to(slab, list(self.sequences.values()))
                old.close()

            with trio.CancelScope(shield=True):  # half-moved sequences must not be left
                await trio.to_thread.run_sync(move, limiter=DECODE)
            self.slab = slab
            self.free_ids += range(old.n_seq, slab.n_seq)
            self._widest = (0, slab.n_seq)  # its buffers are new: the next steps widen them

    async def detach(self, seq: llama.Sequence) -> None:
        """Free the sequence's cells and its place (after its last step)."""
        if not self.closed:  # a stopped scheduler's slab is freed whole
            try:
                await self.clear(seq)
            except (EngineStopped, SequenceClosing):
                if not self.closed:
                    raise
        del self.sequences[seq.seq_id]
        self._served.pop(seq.seq_id, None)
        self.free_ids.append(seq.seq_id)

    # -- work -----------------------------------------------------------------------------------
    def join(self, seq: llama.Sequence) -> None:
        """``seq`` generates: the scheduler waits for its steps before decoding a batch."""
        self.active.add(seq.seq_id)

    def stop(self) -> None:
        """No more steps: every waiting one fails with ``shutting_down``."""
        self.closed = True
        for step in self._waiting:
            if not step.done.is_set():
                step.error = EngineStopped("the daemon is stopping")
                step.finished = True
                step.done.set()
        self._waiting = []

    def step_seconds(self) -> float | None:
        """What a step of the generating sequences takes (None before any was timed)."""
        return self.cost.time(max(1, len(self.active))) if self.cost.samples else None

    def width(self) -> int:
        """The sequences a step of the generating sequences holds (at least 1)."""
        return max(1, len(self.active))

    def draft_cost(self, extra: int) -> float:
        """What ``extra`` draft tokens of one sequence add to a step of the generating
        sequences (relative). Alone, the step is one graph computation of ``1 + extra``
        tokens. Beside others it is two: llama.cpp puts into one ubatch the same number of
        tokens of each sequence (``split_equal``, which a KV pool per sequence needs), so the
        others' one token each and this one's first make a ubatch, and its ``extra`` tokens
        another, as dear as a step of that many tokens (measured on 2 cores: a 48 ms step of
        4 sequences took 115-250 ms with one sequence's 8-token draft)."""
        base = max(1, len(self.active))
        if base == 1:
            return self.cost.relative(extra, 1)
        return 1.0 + (self.cost.draft_time(extra) / self.cost.time(base) if extra else 0.0)

    def draft_whole(self, extra: int) -> bool:
        """Whether the computation ``extra`` draft tokens make (as :meth:`draft_cost`) is of a
        size on the grid (:func:`whole`)."""
        base = max(1, len(self.active))
        return whole(1 + extra) if base == 1 else whole(extra)

    def leave(self, seq: llama.Sequence, *, ended: object = None) -> None:
        """``seq`` stops handing in steps for a while (its generation ended: ``ended`` is its
        client; or its client has no credit left): batches go on without waiting for it."""
        if seq.seq_id in self.active:
            self.active.discard(seq.seq_id)
            if ended is not None:
                self.ended_at, self.ended_by = time.monotonic(), ended
            self._wake.set()
            if not self.active:
                self.cores.streaming(self, None)

    async def clear(self, seq: llama.Sequence) -> None:
        """Free ``seq``'s cells, between two steps."""
        await self.run(Step(seq, [], [], clear=True))

    async def next(self, gen: Generation) -> StepOutput:
        """``gen``'s next step, decoded in a batch with the other sequences' steps: its prompt
        first (the cached prefix reused), then its last token and, with a drafter, a draft to
        verify. The caller asks for the next step once it has used this one's tokens."""
        seq, drafter = gen.seq, gen.drafter
        if gen.started and gen.should_stop():
            return StepOutput([], "cancelled")
        if not gen.started:
            gen.started = True
            first = Step(seq, gen.prompt, gen.stack, prompt=True, logits=gen.pick,
                         should_stop=gen.should_stop, chunk=gen.chunk, pre_stack=gen.pre_stack,
                         split=gen.split, client=gen.client)
            produced = await self.run(first)
            gen.reused = first.reused
            if first.stopped:
                return StepOutput([], "cancelled")
            if drafter is not None:  # it drafts by what a draft costs the batch it joins
                drafter.cost, drafter.whole = self.draft_cost, self.draft_whole
                drafter.width, drafter.step_seconds = self.width, self.step_seconds
                await start_drafting(drafter, gen.prompt, gen.memory)
        elif drafter is None:
            produced = await self.run(Step(seq, [gen.last], gen.stack, logits=gen.pick,
                                           client=gen.client))
        else:
            room = gen.room(self.budget)
            draft, qs = [], None
            if drafter.source is None:  # n-gram lookup: cheap, no thread hop
                draft = drafter.draft(room)
            elif depth := drafter.plan(room):  # a draft model: in its own context
                draft, qs = await trio.to_thread.run_sync(drafter.propose, depth, gen.params,
                                                          gen.rng)
            produced = await self.run(Step(seq, [gen.last, *draft], gen.stack,
                                           outputs=len(draft) + 1,
                                           logits=gen.verify(draft, qs), client=gen.client))
            # the accepted draft tokens, and the one after them
            drafter.record(len(draft), len(produced) - 1, produced[-1][0])
        gen.generated += len(produced)
        gen.last = produced[-1][0]
        if drafter is not None:
            for token, _ in produced:
                drafter.feed(token)
        if gen.should_stop():
            return StepOutput(produced, "cancelled")
        return StepOutput(produced, "length" if gen.at_limit() else None)

    async def run(self, step: Step) -> Any:
        """Queue ``step`` and wait for its result (a cancelled caller still lets the scheduler
        finish the step, so that the sequence's cells stay in step with its tokens)."""
        if self.closed:
            raise SequenceClosing("the context is closing")
        self._waiting.append(step)
        if step.key not in self._order:
            self._order.append(step.key)
        self._wake.set()
        with trio.CancelScope(shield=True):
            await step.done.wait()
        if step.error is not None:
            raise step.error
        return step.result

    async def loop(self) -> None:
        """The scheduler task (until cancelled)."""
        while True:
            if not self._waiting:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            # Gather: wait until every generating sequence has handed in its next step (their
            # Python work between steps then never competes with llama.cpp's threads for the
            # cores, and batches are full); GATHER_S bounds the wait if one is slow.
            deadline = trio.current_time() + GATHER_S
            while not self.active <= {s.seq.seq_id for s in self._waiting}:
                self._wake = trio.Event()
                with trio.move_on_at(deadline):
                    await self._wake.wait()
                if trio.current_time() >= deadline:
                    break
            async with self._stepping, self.cores.lock:
                await self._place()
                batch = await self._rotate(self._pick())
                began, tokens = time.monotonic(), self.tokens
                started = time.perf_counter()
                with self.cores.ingress.decoding():
                    await self.cores.thread.run(self.cores.team.run, self.slab.n_threads,
                                                self._decode, batch)
            elapsed = time.perf_counter() - started
            if self.tokens > tokens:
                self.timeline.append((began, elapsed, self.tokens - tokens))
            if batch:
                decodes, prompts = self._shape
                steps = [s for s in batch if not s.prompt]
                if prompts and not self.widened and not self._rode:
                    self.cost.observe_prompt(decodes, prompts, elapsed)
                    if self._split and prompts <= SPLIT_TOKENS:
                        self.cost.observe_split(decodes, elapsed)
                elif not prompts and steps and all(s.outputs == len(s.tokens) for s in steps):
                    # one ubatch (as many tokens of each sequence) is a step of its size; a
                    # draft beside others' single tokens is a computation more (draft_cost),
                    # timed even when it widens the buffers: what a draft there costs is
                    # learnt from few such steps, and it is what decides the next ones
                    if len({len(s.tokens) for s in steps}) > 1:
                        self.cost.observe_draft(len(steps), decodes - len(steps), elapsed)
                    elif not self.widened:
                        self.cost.observe(decodes, elapsed)
            self.cores.streaming(self, self.step_seconds() if self.active else None)
            for step in batch:
                if step.finished:
                    step.done.set()
            self._waiting = [s for s in self._waiting if not s.finished]
            self.steps += 1

    def _pick(self) -> list[Step]:
        """The next stack in rotation that has work: all its decodes, then its prompt chunks
        while the budget lasts."""
        keys = {s.key for s in self._waiting}
        self._order = [k for k in self._order if k in keys]
        self._order += [k for k in dict.fromkeys(s.key for s in self._waiting)
                        if k not in self._order]  # a prompt that moved on to another stack
        if self._serving in keys and self._turn_left > 0:
            key = self._serving  # its turn goes on
        else:
            key = self._order.pop(0)
            self._order.append(key)  # the next turn serves the next stack
            self._serving, self._turn_left = key, QUANTUM
        self._turn_left -= 1
        mine = [s for s in self._waiting if s.key == key]
        decodes = [s for s in mine if not s.prompt]
        prompts = [s for s in mine if s.prompt]
        batch, used = [], 0
        for s in decodes:
            if used and used + len(s.tokens) > self.budget:
                break
            batch.append(s)
            used += len(s.tokens)
        batch, prompts = self._share_rows(batch, prompts)
        used = sum(len(s.tokens) for s in batch)
        ride = [s.seq.seq_id for s in batch] if all(len(s.tokens) == 1 for s in batch) \
            else None
        streaming = {s.owner for s in self._waiting if not s.prompt}  # every stack's streams
        now = time.monotonic()
        for owner, n in Counter(s.owner for s in self._waiting).items():
            if n > 1:
                self.cores.side_by_side(owner, now)
        prompting = {s.owner for s in prompts}
        theirs = sum(len(s.tokens) for s in batch if s.owner not in prompting)
        self._room = min(self.budget - used,
                         self._prompt_room(used, prompts, ride, streaming, theirs))
        if self._room > 0:  # every prompt: the step's room is shared out among them
            batch += prompts
        return batch

    def _share_rows(self, decodes: list[Step], prompts: list[Step]
                    ) -> tuple[list[Step], list[Step]]:
        """The decodes and prompts of a step beside other clients' streams: a client with more
        than one sequence in it (its decodes and prompts) gets as many of them as add at most
        ``prompt_share`` to the step of the others' decodes (the rows that fill the gaps
        between sequence ids counted; a row at least ``ROW_PRICE`` of a one-token step), at
        least one, its sequences served least recently first; the others wait for the next
        steps. Each sequence a client adds is a row of the others' step (on gemma 3 270M, 2
        cores: a 23 ms step of one stream took 35-48 ms with the four sequences of the HTTP
        door's small requests beside it)."""
        clients = Counter(s.owner for s in itertools.chain(decodes, prompts))
        streaming = {s.owner for s in decodes}
        if len(clients) < 2 or not any(n > 1 and streaming - {c} for c, n in clients.items()):
            return decodes, prompts
        out: set[int] = set()
        unit = self.cost.time(1)
        for client, n in clients.items():
            others = [s for s in decodes if s.owner != client]
            if n < 2 or not others:
                continue
            rows = self._width(others)
            base = self.cost.time(rows)
            allowed = self.cores.prompt_share * base
            ids = {s.seq.seq_id for s in others}
            mine = sorted((s for s in itertools.chain(decodes, prompts) if s.owner == client),
                          key=lambda s: (self._served.get(s.seq.seq_id, -1),
                                         min(abs(s.seq.seq_id - i) for i in ids)))
            kept: list[Step] = []
            for step in mine:
                wider = self._width(others + kept + [step])
                added = max(self.cost.time(wider) - base, ROW_PRICE * unit * (wider - rows))
                if not kept or added <= allowed:
                    kept.append(step)
                else:
                    out.add(id(step))
        for step in itertools.chain(decodes, prompts):
            if id(step) in out:
                if not step.capped:
                    step.capped = True
                    self.capped += 1
            else:
                self._served[step.seq.seq_id] = self.steps
        return ([s for s in decodes if id(s) not in out],
                [s for s in prompts if id(s) not in out])

    def _width(self, steps: list[Step]) -> int:
        """The rows a step of ``steps`` decodes, a prompt counted as one token (its least):
        with a KV pool per sequence and one token each, the run of ids from the lowest to the
        highest (:meth:`_rows`)."""
        if not self.slab.unified and all(s.prompt or len(s.tokens) == 1 for s in steps):
            return self._rows({s.seq.seq_id for s in steps})
        return sum(1 if s.prompt else len(s.tokens) for s in steps)

    def _prompt_room(self, decodes: int, prompts: list[Step],
                     ride: list[int] | None = None, streaming: set[object] | None = None,
                     theirs: int = 0) -> int:
        """How many prompt tokens a step of ``decodes`` decode tokens may take: all the budget
        while no context of the model streams; else as many as add at most ``prompt_share``
        to the time of the streams' step (this slab's, or the slowest other slab's: a step of
        another slab is a wait of the same length). Short prompts (at most ``SHORT_PROMPT``
        tokens left) are fed whole, the shortest first, together up to the share or
        ``SHORT_PROMPT`` tokens, whichever is more, times the clients waiting per client
        streaming (:meth:`_burst`), and at least one a step (a new request starts at once;
        many at once take turns of a few), and long ones share what is left
        of the room once every short one is in, at least one token. A short prompt beside
        long ones counts as a stream about to start (a one-token step) when nothing streams:
        a new request is not held behind a whole budget of another's prompt (1.1-1.5 s on
        gemma 3 270M, 2 cores); so do another client's long prompts for ``STREAM_GRACE_S``
        after a generation of this slab ended (or another slab's streams:
        :meth:`Cores.stream_seconds`), so that the next request of a client that streams
        request after request finds no such step under way.
        Beside the streams of another client on this slab (``streaming``: the clients whose
        sequences generate), a short prompt past the share is fed whole if its client runs
        requests one at a time, or has not had one so fed within ``Cores.start_interval``
        (:meth:`Cores.may_start`); else it is held to the share as a long one. The share is
        then of the step of the clients whose decodes are in it without a prompt (``theirs``:
        their decode tokens): a client's own rows do not widen what its prompts may add to
        another's step.

        With a KV pool per sequence, llama.cpp computes a step in ubatches of as many tokens
        of each sequence (``split_equal``): beside one-token decodes (``ride``: their sequence
        ids), a prompt chunk of one token joins their computation, as one more sequence would,
        while a longer one is a computation of its own, whatever its length (measured on
        gemma 3 270M, Intel Xeon, 2 cores, next to one stream of 22 ms: one prompt token
        25 ms, two 36 ms, eight 52 ms). Where that computation (learnt:
        :meth:`StepCost.split_time`) costs more than the share, and one token of the first
        long prompt costs less than it (with the rows that fill the gaps between sequence
        ids, :meth:`_fillers`), each long prompt is fed one token a step, as many as the share
        allows, so that the streams' steps keep to it."""
        # beside another client's streams, the share is of their step: a client's own rows in
        # it do not widen what its prompts may add to the others'
        streams = self.cost.time(theirs if 0 < theirs < decodes else decodes) if decodes else 0.0
        # another slab's step times are seconds: comparable once this kind has timed steps
        others = self.cores.stream_seconds(self) if self.cost.samples else None
        lefts = [len(s.pending) if s.started else len(s.tokens) for s in prompts]
        # a short prompt beside long ones is a request about to stream: its first step is
        # held to the share as a stream's would be, not filled up with the long prompts; so
        # is a step of long prompts just after a stream ended (its client's next request is
        # most likely on its way)
        n_short = sum(n <= SHORT_PROMPT for n in lefts)
        starting = (not streams and bool(self.cost.samples) and n_short < len(lefts)
                    and (n_short > 0 or (time.monotonic() - self.ended_at < STREAM_GRACE_S
                                         and any(s.owner != self.ended_by for s in prompts))))
        self._held, self._starts = set(), {}
        if not streams and others is None and not starting:
            return self.budget
        base = max(streams, others or 0.0, self.cost.time(1) if starting else 0.0)
        per_token = self.cost.prompt_token()
        # the prompting clients' own decodes in the step took part of their share already
        spent = self.cost.time(decodes) - streams if 0 < theirs < decodes else 0.0
        allowed = max(0.0, self.cores.prompt_share * base - spent)
        share = max(1, int(allowed / per_token))
        split = self.cost.split_time()
        # what the share pays for, in short prompts fed whole: beside one-token decodes (a KV
        # pool per sequence) a chunk of more than one token is a computation of its own
        within = self._within = (share if not ride or self.slab.unified
                                 else max(1, int((allowed - split) / per_token)))
        now, streaming = time.monotonic(), streaming or set()
        for step, n in sorted(zip(prompts, lefts, strict=True), key=lambda p: p[1]):
            if n > SHORT_PROMPT or not streaming - {step.owner}:
                # a long one; or beside no other client's streams on this slab: whole (a
                # step of another slab is a wait of a whole step for its streams, whatever its
                # size: held to the share, its prompts made many such waits)
                continue
            if n <= within:
                within -= n  # within the share, the shortest first
            elif (step.owner not in self._starts.values()
                  and self.cores.may_start(step.owner, now)):
                self._starts[id(step)] = step.owner  # past it: one a client an interval
            else:
                self._held.add(id(step))
                if not step.held:
                    step.held = True
                    self.held += 1
        fed: list[Step] = []  # short prompts fed whole, the shortest first
        shorts = sorted(((s, n) for s, n in zip(prompts, lefts, strict=True)
                         if n <= SHORT_PROMPT and id(s) not in self._held), key=lambda p: p[1])
        whole, cap = 0, max(share, SHORT_PROMPT) * self._burst(shorts, streaming)
        for step, n in shorts:
            if whole and whole + n > cap:
                return whole  # the other short prompts come next, the long ones after them
            whole += n
            fed.append(step)
        if len(fed) == len(lefts):
            return whole
        if not ride or self.slab.unified or whole > len(fed):
            # (a short prompt of more than one token is a computation of its own: the long
            # ones join it)
            return whole + max(1, share - whole)
        # a chunk beside one-token decodes (and short prompts of one token, which ride along
        # as they would) is a computation of its own: its tokens get what the share leaves
        # once that computation is paid for
        ids = set(ride) | {s.seq.seq_id for s in fed}
        rows = self._rows(ids)
        allowed -= self.cost.time(rows) - self.cost.time(self._rows(set(ride)))
        chunk = int((allowed - split) / per_token)
        if chunk < 2:
            # one token of each long prompt, in the order the quotas serve them
            longs = sorted((s for s in prompts if s not in fed),
                           key=lambda s: min(s.chunk, len(s.pending) if s.started
                                             else len(s.tokens)))
            fit = 0
            for step in longs:
                ids.add(step.seq.seq_id)
                extra = self.cost.time(self._rows(ids)) - self.cost.time(rows)
                if extra > (allowed if fit else split):
                    break
                fit += 1
            if fit:
                return whole + fit
        return whole + max(1, chunk)

    @staticmethod
    def _burst(shorts: list[tuple[Step, int]], streaming: set[object]) -> float:
        """How many times the usual room short prompts get together: the clients waiting for
        their first token (their short prompts, none of them streaming) per client streaming,
        at least 1. A burst of new clients joins the streams at once, as llama-server batches
        all of their prompts: fed a few a step, 32 clients arriving together waited 4.1-6.0 s
        for their last first token against llama-server's 1.6-2.1 s, in 11 steps each 1.5-2x
        as long as the streams' own (gemma 3 270M, AMD EPYC, 2 cores). One new client beside
        streams, a client whose requests run side by side (one client, however many of its
        prompts wait), and prompts beside the streams of another slab only (whose clients this
        one does not count) keep the usual room."""
        if not streaming:
            return 1.0
        waiting = {s.owner for s, _ in shorts} - streaming
        return max(1.0, len(waiting) / len(streaming))

    async def _place(self) -> None:
        """Put each long prompt about to start next to the sequences that generate, where an
        id among or beside theirs is free or held by a sequence between requests: the two
        exchange their ids and cells (:meth:`llama.Slab.exchange`, at most ``MOVE_CELLS``
        cached tokens copied). With a KV pool per sequence a step computes one run of
        consecutive ids at once, and the ids between are filled (:meth:`_fillers`): a prompt
        fed beside a stream over four contexts between requests (the HTTP door's) took its
        steps from 23 to 54 ms on gemma 3 270M (their attention spans the prompt's cells),
        against 25 ms beside it."""
        if self.slab.unified:
            return
        longs = [s for s in self._waiting if s.prompt and not s.started
                 and len(s.tokens) > SHORT_PROMPT and s.seq.seq_id in self.active]
        for n, step in enumerate(longs):
            seq = step.seq
            # what it goes next to: the others that generate (those placed before it too), not
            # the long prompts still to be placed
            others = self.active - {s.seq.seq_id for s in longs[n:]}
            if not others:
                continue
            waiting = {s.seq.seq_id for s in self._waiting}
            low, high = min(others), max(others)

            def gaps(at: int, low: int = low, high: int = high, n: int = len(others)) -> int:
                return to_fill(low, high, n, at)

            def movable(at: int, seq: llama.Sequence = seq, waiting: set[int] = waiting
                        ) -> bool:
                other = self.sequences.get(at)
                return (at not in self.active and at not in waiting
                        and len(seq.tokens) + len(other.tokens if other else ()) <= MOVE_CELLS)

            places = [at for at in range(max(0, low - 1), min(self.slab.n_seq, high + 2))
                      if movable(at)]
            best = min(places, key=lambda at: (gaps(at), at), default=None)
            if best is not None and gaps(best) < gaps(seq.seq_id):
                await self._exchange(seq, best)

    async def _rotate(self, batch: list[Step]) -> list[Step]:
        """Put the sequences of a step of one token each next to one another where that is
        cheap: a sequence with few cached tokens exchanges its id with a gap of the run of
        ids (free, or a sequence not in the step with few cached tokens too: at most
        ``ROTATE_CELLS`` together), so that the step has no ids to fill (:meth:`_fillers`). A
        client whose sequences take turns in others' steps (:meth:`_share_rows`) has one far
        from them a step, and the HTTP door's short requests are such sequences: the stream's
        23 ms step took 30 ms with two ids filled, 34 ms with four, 27 with none (gemma 3 270M,
        2 cores, during the HTTP flood). Returns the batch without the steps of a sequence
        whose cells did not arrive (failed with :class:`CacheLost`)."""
        if (self.slab.unified or len(batch) < 2
                or any(len(s.tokens) != 1 for s in batch if not s.prompt)):
            return batch
        ids = {s.seq.seq_id for s in batch}
        small = [s.seq for s in batch if len(s.seq.tokens) < ROTATE_CELLS]
        for _ in range(len(small)):  # each pass moves one at most: until none helps
            if max(ids) - min(ids) < len(ids):
                break  # one run already (the common case: nothing to weigh)
            moves = []
            for seq in small:
                rest = ids - {seq.seq_id}
                low, high, now = min(rest), max(rest), seq.seq_id
                here = to_fill(low, high, len(rest), now)
                for at in range(max(0, low - 1), min(self.slab.n_seq, high + 2)):
                    other = self.sequences.get(at)
                    if at in rest or len(seq.tokens) + (
                            len(other.tokens) if other is not None else 0) > ROTATE_CELLS:
                        continue
                    moves.append((to_fill(low, high, len(rest), at) - here, abs(at - now),
                                  now, at))
            if not moves or (best := min(moves))[0] >= 0:
                break
            seq, at = self.sequences[best[2]], best[3]
            for lost in await self._exchange(seq, at):
                for step in self._waiting:  # a generation's cells are its tokens so far
                    if step.seq is lost and (not step.prompt or step.started):
                        step.error = CacheLost("the sequence's cached tokens were lost as "
                                               "the scheduler moved it in its slab")
                        step.finished = True
                        step.done.set()
            ids = (ids - {best[2]}) | {at}
        return [s for s in batch if not s.finished]

    async def _exchange(self, seq: llama.Sequence, at: int) -> list[llama.Sequence]:
        """Give ``seq`` the id ``at`` (free, or the id of another sequence, which takes
        ``seq``'s) with its cells; the ids are the scheduler's at once, the cells follow in the
        decode thread before the next step (the caller holds the slab between steps). Returns
        the sequences whose cells did not arrive (they start again empty)."""
        old, other = seq.seq_id, self.sequences.get(at)
        cells = (bool(seq.tokens), bool(other is not None and other.tokens))
        seq.seq_id = at
        self.sequences[at] = seq
        active = {at} if old in self.active else set()
        served = {i: self._served.pop(j) for i, j in ((at, old), (old, at))
                  if j in self._served}
        if other is None:
            self.free_ids.remove(at)
            del self.sequences[old]
            self.free_ids.append(old)
        else:
            other.seq_id = old
            self.sequences[old] = other
            active |= {old} if at in self.active else set()
        self.active -= {old, at}
        self.active |= active
        self._served.update(served)
        self.moves += 1
        arrived = (False, False)  # a failure leaves both without cells
        lost = []
        try:
            arrived = await self.cores.thread.run(self.slab.exchange, old, at, *cells)
        finally:
            for moved, ok, had in zip((seq, other), arrived, cells, strict=True):
                if moved is not None and not ok:
                    moved._cut(0)
                    lost += [moved] if had else []
        return lost

    def _rows(self, ids: set[int]) -> int:
        """The rows a step of one token of each of ``ids`` decodes: the run from the lowest
        to the highest, made whole where the slab has room (see :meth:`_fillers`)."""
        n = max(ids) - min(ids) + 1
        while not whole(n) and n < self.slab.n_seq:
            n += 1
        return n

    def _decode(self, batch: list[Step]) -> None:
        """One scheduler step, in a worker thread: the only code that calls llama.cpp here."""
        slab = self.slab
        if not batch:
            return
        key, pairs = batch[0].key, batch[0].pairs  # every step of the batch has this stack
        # By sequence id: with a KV pool per sequence, llama.cpp puts into one ubatch only a
        # run of consecutive sequence ids in batch order (split_equal, sequential), so any
        # other order splits the batch into several graph computations.
        batch = sorted(batch, key=lambda step: step.seq.seq_id)
        entries: list[tuple[llama.Sequence, list[int], int]] = []
        stepped: list[tuple[Step, list[int], bool]] = []
        decoded = prompted = 0
        shorts = 0  # prompt chunks of prompts fed whole (not held to the share)
        quotas = self._prompt_quotas(batch, key)
        for step in batch:
            try:
                if step.prompt:
                    if step.finished:  # stopped (or failed) as its quota was reckoned
                        continue
                    n = quotas.get(id(step), 0)
                    if n <= 0:  # no room left in this step: the next one goes on
                        continue
                    shorts += len(step.pending) <= SHORT_PROMPT and id(step) not in self._held
                    tokens, step.pending = step.pending[:n], step.pending[n:]
                    last = not step.pending
                    entries.append((step.seq, tokens, 1 if last else 0))
                    stepped.append((step, tokens, last))
                    prompted += n
                elif step.tokens:
                    if step.seq.tokens and step.seq.stack_key != step.key:
                        raise RuntimeError("a sequence decoded under another stack")
                    entries.append((step.seq, step.tokens, step.outputs))
                    stepped.append((step, step.tokens, True))
                    decoded += len(step.tokens)
                else:  # housekeeping only
                    if step.clear:
                        slab.clear_seq(step.seq)
                    step.finished = True
            except Exception as exc:  # handed to the step's owner
                step.error = exc
                step.pending = []
                step.finished = True
        self._shape = (decoded, prompted)
        # prompt tokens that rode along, one per sequence beside one-token decodes, joined
        # their computation: what they added (often nothing measurable) is not what a prompt
        # token costs in a chunk (a median of 0 once made the share unbounded)
        self._rode = bool(decoded) and all(len(t) == 1 for _, t, _ in stepped)
        # what the share decides on: chunks of long prompts only, beside one-token decodes
        # of a size timed on its own (a time interpolated between sizes is too rough a base)
        self._split = (bool(decoded) and not slab.unified and not shorts
                       and decoded in self.cost.samples
                       and all(len(t) == 1 for st, t, _ in stepped if not st.prompt)
                       and any(len(t) > 1 for st, t, _ in stepped if st.prompt))
        if not entries:
            return
        try:
            if slab._adapters != key:
                self.stack_switches += 1
            slab.set_adapters(pairs, key)
            width = (sum(len(t) for _, t, _ in entries), sum(o for *_, o in entries))
            self.widened = width[0] > self._widest[0] or width[1] > self._widest[1]
            self._widest = (max(width[0], self._widest[0]), max(width[1], self._widest[1]))
            starts = slab.decode(entries, self._fillers(entries))
            self.tokens += width[0]
        except Exception as exc:
            for step, _, _ in stepped:
                step.error, step.pending = exc, []
                step.finished = True
            return
        for (step, tokens, last), start in zip(stepped, starts, strict=True):
            if step.prompt:
                step._target(step.position + len(tokens))
            if not last:
                continue
            index = start + len(tokens) - (1 if step.prompt else step.outputs)
            try:
                step.result = step.logits(slab, index) if step.logits else None
            except Exception as exc:
                step.error = exc
            step.finished = True

    def _fillers(self, entries: list[tuple[llama.Sequence, list[int], int]]
                 ) -> list[tuple[int, int, bool]]:
        """The gaps between the sequence ids of a step of one token per sequence, filled (see
        :meth:`llama.Slab.decode`): without them, a context between requests among those that
        stream (one that finished first, say) split every step of the others in two graph
        computations (80 ms against 55 for 8 sequences of gemma 270M on 2 cores). Only with a
        KV pool per sequence (a unified pool needs none) and a memory that can drop the
        filler's cell again. A filler has an output row only where that makes the step's
        outputs a whole size: an output row is a product with the whole vocabulary (on gemma
        3 270M, Intel Xeon, 2 cores: two streams at ids 1 and 5 with four fillers took 56 ms
        with their rows, 34 without, against 27 for two neighbours)."""
        slab = self.slab
        if (slab.unified or len(entries) < 2 or any(len(t) != 1 for _, t, _ in entries)
                or not slab.model.can_roll_back):
            return []
        ids = {seq.seq_id for seq, _, _ in entries}

        def filler(sid: int) -> tuple[int, int, bool] | None:
            seq = self.sequences.get(sid)
            pos = len(seq.tokens) if seq is not None else 0
            # a full one lends no cell
            return (sid, pos, False) if pos < slab.n_ctx_seq else None

        fillers = []
        for sid in range(min(ids), max(ids)):
            if sid not in ids:
                if (one := filler(sid)) is None:
                    return []  # the step splits
                fillers.append(one)
        # An odd size costs more than the even size above it (matrix kernels work on blocks
        # of tokens): a filler next to the run makes it whole.
        low, high = min(ids), max(ids)
        while not whole(len(entries) + len(fillers)):
            sid = high + 1 if high + 1 < slab.n_seq else low - 1
            if sid < 0 or (one := filler(sid)) is None:
                break
            fillers.append(one)
            low, high = min(low, sid), max(high, sid)
        if len(entries) + len(fillers) > slab.n_batch:
            return []
        # An odd number of outputs costs more than the even one above it, too (7 against 8:
        # 61 against 54 ms, AMD EPYC): as few fillers as make it whole get output rows.
        outputs = sum(o for *_, o in entries)
        rows = next((k for k in range(len(fillers) + 1) if whole(outputs + k)), 0)
        return [(sid, pos, k < rows) for k, (sid, pos, _) in enumerate(fillers)]

    def _prompt_quotas(self, batch: list[Step], key: tuple[tuple[int, float], ...]
                       ) -> dict[int, int]:
        """The tokens each prompt of ``batch`` decodes in this step (by ``id``): the step's
        prompt room shared out, the shortest first, each taking at most an equal share of what
        is left, so that a short prompt is not held behind a long one (each prompt at most
        its own chunk, and up to its change of stack)."""
        wants: list[tuple[int, Step]] = []
        for step in batch:
            if not step.prompt:
                continue
            try:
                if not step.started:
                    self._start_prompt(step)
                if step.should_stop():
                    step.stopped, step.pending = True, []
                    step.finished = True
                    continue
            except Exception as exc:  # handed to the step's owner
                step.error, step.pending = exc, []
                step.finished = True
                continue
            if step.key != key:  # its cache reached past a change of stack
                continue
            n = min(step.chunk, len(step.pending))
            if step.position < step.split:
                n = min(n, step.split - step.position)
            wants.append((n, step))
        wants.sort(key=lambda w: (id(w[1]) in self._held, w[0]))  # held ones as long ones
        quotas: dict[int, int] = {}
        left = self._room
        for i, (n, step) in enumerate(wants):
            if (n <= SHORT_PROMPT and len(step.pending) <= SHORT_PROMPT
                    and id(step) not in self._held):
                q = n if n <= left else 0  # whole, or in a later step
                if q > self._within and id(step) in self._starts:
                    self.cores.started(step.owner, time.monotonic())
                    self.starts += 1
            else:
                q = min(n, -(-left // (len(wants) - i)))  # ceil
            quotas[id(step)] = q
            left -= q
        return quotas

    def _start_prompt(self, step: Step) -> None:
        seq, prompt = step.seq, step.tokens
        common = 0
        limit = min(len(prompt), len(seq.tokens))
        while (common < limit and prompt[common] == seq.tokens[common]
               and seq.keys[common] == step.want(common)):
            common += 1
        reused = min(common, len(prompt) - 1)  # the last token is decoded for its logits
        seq.keep(reused)
        step.reused = len(seq.tokens)
        step.pending = list(prompt[step.reused:])
        step._target(step.reused)
        step.started = True


@dataclass(frozen=True)
class SlabKey:
    """What contexts must share to be sequences of one slab."""

    n_ctx_seq: int
    kv_type: str
    flash_attn: bool | None
    n_threads: int


class Batcher:
    """The slabs of one model: places a new context in a slab of its kind with a free
    sequence; a full slab is widened (twice as many sequences, up to ``sequences``: the
    contexts' cached tokens are moved into it, not evaluated again), and a kind whose slab
    is at its widest gets another slab. A slab starts with one sequence, so memory follows
    the contexts that exist: at most twice their KV caches, and a context alone costs its
    own. A slab of one sequence outlives its last context by ``keep_idle`` seconds, for the
    next context of its kind (a client that makes and closes contexts one after another
    allocates and clears a KV cache once); the memory budget frees it first when it needs
    the room."""

    def __init__(self, model: llama.Model, *, sequences: int, budget: int, unified: bool,
                 nursery: trio.Nursery, memory: MemoryBudget | None = None,
                 model_id: str = "", prompt_share: float = 0.5,
                 ingress: Ingress | None = None, keep_idle: float = 0.0,
                 pin_threads: bool = False, start_interval: float = 5.0) -> None:
        self.model = model
        self.sequences = sequences
        self.budget = budget
        self.unified = unified
        self.keep_idle = keep_idle
        self._idle: dict[int, float] = {}
        """Idle slabs (by their scheduler's ``id``): until when they are kept."""
        self.memory = memory if memory is not None else MemoryBudget()
        self.model_id = model_id
        self.kv = KvShape.of(model)
        self._nursery = nursery
        self.slabs: dict[SlabKey, list[tuple[SlabScheduler, trio.CancelScope]]] = {}
        self.cores = Cores(prompt_share, ingress, Team(pin_threads), start_interval)
        """Shared by the model's slabs (see :class:`Cores`)."""
        self.costs: dict[SlabKey, StepCost] = {}
        """Step costs learnt per kind of slab, kept when its slabs go: a context created
        after the last one closed drafts from the first step on what steps are known to cost."""
        self._lock = trio.Lock()

    async def attach(self, *, n_ctx: int, n_batch: int, n_threads: int, kv_type: str,
                     flash_attn: bool | None) -> tuple[SlabScheduler, llama.Sequence]:
        key = SlabKey(llama.padded_n_ctx(n_ctx), kv_type, flash_attn, n_threads)
        n_batch = max(self.budget, n_batch)
        async with self._lock:
            slabs = self.slabs.get(key, [])
            for scheduler, _ in slabs:
                if scheduler.free_ids:
                    if self._idle.pop(id(scheduler), None) is not None and \
                            scheduler.reservation is not None:
                        scheduler.reservation.reclaim = None  # in use again
                    return scheduler, scheduler.attach(key.n_ctx_seq)
            growing = next((s for s, _ in slabs if s.slab.n_seq < self.sequences), None)
            n_seq = 1 if growing is None else min(self.sequences, growing.slab.n_seq * 2)
            nbytes = self.kv.bytes(key.n_ctx_seq * n_seq, kv_type)
            what = (f"a KV cache of {n_seq} x {key.n_ctx_seq} cells ({kv_type}) on model "
                    f"{self.model_id!r}")
            # While the wider slab is made, the old one still holds its sequences.
            self.memory.check(what, nbytes, model=self.model_id, n_ctx=key.n_ctx_seq,
                              sequences=n_seq, kv_type=kv_type,
                              replacing=growing.reservation.nbytes
                              if growing is not None and growing.reservation else 0)
            started = time.perf_counter()
            slab = await BUILD.run(lambda: llama.Slab(
                self.model, n_seq=n_seq, n_ctx_seq=key.n_ctx_seq, n_batch=n_batch,
                n_threads=n_threads, kv_type=kv_type, flash_attn=flash_attn,
                unified=self.unified))
            ms = round((time.perf_counter() - started) * 1000, 1)
            if growing is not None:
                moved = len(growing.sequences)
                await growing.widen(slab)
                if growing.reservation is not None:
                    growing.reservation.resize(nbytes, what)
                log.info("slab_widened", model=self.model_id, sequences=n_seq, moved=moved,
                         n_ctx_seq=slab.n_ctx_seq, kv_bytes=nbytes, ms=ms)
                return growing, growing.attach(key.n_ctx_seq)
            scheduler = SlabScheduler(slab, self.budget, self.costs.setdefault(key, StepCost()),
                                      self.cores)
            scheduler.reservation = self.memory.reserve(what, nbytes)
            scope = await self._nursery.start(self._serve, scheduler)
            self.slabs.setdefault(key, []).append((scheduler, scope))
            log.info("slab_created", model=self.model_id, sequences=n_seq,
                     n_ctx_seq=slab.n_ctx_seq, kv_type=kv_type, unified=self.unified,
                     kv_bytes=nbytes, ms=ms)
            return scheduler, scheduler.attach(key.n_ctx_seq)

    async def _serve(self, scheduler: SlabScheduler, *,
                     task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await scheduler.loop()
            finally:  # stopped (the daemon is ending): nothing may wait for it any more
                scheduler.stop()

    async def detach(self, scheduler: SlabScheduler, seq: llama.Sequence) -> None:
        """Free the sequence; a slab left without sequences is freed too, or kept idle for
        ``keep_idle`` seconds when it has one sequence."""
        await scheduler.detach(seq)
        async with self._lock:
            if scheduler.sequences or scheduler.closed:
                return
            if self.keep_idle > 0 and scheduler.slab.n_seq == 1:
                until = trio.current_time() + self.keep_idle
                self._idle[id(scheduler)] = until
                if scheduler.reservation is not None:
                    scheduler.reservation.reclaim = lambda: self._drop(scheduler)
                self._nursery.start_soon(self._expire, scheduler, until)
                return
            await self._free(scheduler)

    async def _expire(self, scheduler: SlabScheduler, until: float) -> None:
        """Free an idle slab once its time is up, unless a context took it meanwhile."""
        await trio.sleep_until(until)
        async with self._lock:
            if self._idle.get(id(scheduler)) != until or scheduler.closed:
                return  # taken (or taken and left again: a later timer frees it)
            await self._free(scheduler)

    async def _free(self, scheduler: SlabScheduler) -> None:
        """Free a slab without sequences, its llama context in a thread (the lock held)."""
        self._forget(scheduler)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(scheduler.slab.close)

    def _drop(self, scheduler: SlabScheduler) -> None:
        """Free an idle slab now (the memory budget needs its room): it has no sequence, so
        nothing decodes on it; freeing it takes milliseconds, in the trio thread."""
        self._forget(scheduler)
        scheduler.slab.close()

    def _forget(self, scheduler: SlabScheduler) -> None:
        """Take a slab without sequences out of service: its scheduler stops and its
        reservation is released (the caller frees the llama context)."""
        for key, slabs in list(self.slabs.items()):
            for pair in slabs:
                if pair[0] is scheduler:
                    slabs.remove(pair)
                    pair[1].cancel()
            if not slabs:
                del self.slabs[key]
        self._idle.pop(id(scheduler), None)
        scheduler.closed = True
        self.cores.streaming(scheduler, None)
        if scheduler.reservation is not None:
            scheduler.reservation.release()

    def close(self) -> None:
        """Free every slab (the daemon is stopping: their schedulers are cancelled)."""
        for slabs in self.slabs.values():
            for scheduler, scope in slabs:
                scope.cancel()
                scheduler.closed = True
                if scheduler.reservation is not None:
                    scheduler.reservation.release()
                scheduler.slab.close()
        self.slabs.clear()
        self._idle.clear()
        self.cores.close()

    def info(self) -> list[dict[str, Any]]:
        """Each slab: its kind, sequences used, and what its scheduler did."""
        return [{"n_ctx_seq": k.n_ctx_seq, "kv_type": k.kv_type, "flash_attn": k.flash_attn,
                 "n_threads": k.n_threads, "sequences": s.slab.n_seq, "used": len(s.sequences),
                 "steps": s.steps, "tokens": s.tokens, "stack_switches": s.stack_switches,
                 "moves": s.moves, "starts": s.starts, "held": s.held, "capped": s.capped,
                 "step_ms": s.cost.table(), "idle": id(s) in self._idle,
                 "timeline": [[round(t, 6), round(dt * 1000, 3), n] for t, dt, n in s.timeline]}
                for k, slabs in self.slabs.items() for s, _ in slabs]


