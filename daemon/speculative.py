"""Speculative decoding: drafts from n-grams of the prompt and output, or of the context's
memory of earlier outputs (``prompt_lookup``, :mod:`.ngrams`), or from a smaller model with the
same vocabulary (``draft_model``), verified by the target model.

The target verifies a draft in one batch. Greedy (temperature 0): a draft token is kept while it
equals the target's argmax, and the first disagreement is replaced by the target's token, so the
output is the target's own, token for token, whatever the draft depth. Sampling: the standard
speculative-sampling rule (accept a draft token ``d`` with probability ``min(1, p(d)/q(d))``,
else sample from ``max(0, p - q)`` renormalised; after a fully accepted draft, sample one more
token from ``p``), where ``p`` is the target's distribution after the request's own sampler
chain (top-k, top-p, min-p, temperature, as in ``llama.Sampler``) and ``q`` the draft's (a
one-hot for n-gram drafts): the output distribution is the target's own.

The depth is chosen for speed, step by step: the drafter estimates the chance that each draft token
is accepted, given its predecessors were (tokens judged so far, recent ones weighing more: a draft
model's in this request, n-gram drafts' in the context's requests, carried from one to the next, so
that a passage copied well is drafted deep at once when sent again). For n-gram drafts there is one
estimate per length of agreement between the history's end and the earlier occurrence drafted from
(1 to 15 tokens, and 16+), each drawn toward the estimate of its group of lengths (1, 2-3, 4-7,
8-15, 16+: priors 0.3 to 0.98, a passage being copied agrees over many tokens, a common word in open
text over one or two) until it has seen ``LENGTH_WEIGHT`` judged tokens of its own; the ``i``-th
token of a draft whose first agrees over ``m`` tokens agrees over ``m + i - 1`` once its
predecessors are accepted, so a copy that has just begun is trusted more the further it would go.
(On gemma's own outputs, tokens agreeing over 16+ tokens were accepted about 99 % of the time, over
one token about 40 %.) N-gram drafts learn for free: the proposal's next token after the drafted
ones (all of it at depth 0) is judged against the token the step produces, so no draft is ever spent
to find out whether drafting would pay. The engine knows what ``d`` more tokens add to a step
(``cost(d)``, learnt from its own step times). A draft of ``d`` tokens yields ``1 + p1 + p1 p2 + ...
+ p1...pd`` tokens on average for ``cost(d)`` the time, so the depth is the ``d`` (0 included) that
maximises their ratio: a rejected draft's cost is counted, and where drafting cannot pay, it stops.
Only depths that make a step of a size on the engine's grid (``batching.whole``: 2, 3, 4, 6, 8, 12,
16, 24, ... tokens) are weighed, and the whole proposal where it is shorter than ``max_draft``: step
costs are not smooth in the size. On a step whose draft could finish the request (``max_tokens``), a
shorter draft is charged the one more step its rest would take. A draft model's proposal costs its
own decoding, so it has no free judgement: at depth 0 a one-token draft probes, but only where its
success would change the decision (the estimate with one more accepted token would draft): the first
such chance probes at once, the next ones come ``PROBE_EVERY`` steps later, the interval doubling
after each rejected probe up to ``PROBE_MAX``, and at least as many steps as keep a failing probe's
cost within ``PROBE_BUDGET`` of the time. Its own time per drafted token (measured, its catching up
with the text included) counts in a draft's cost, and every token of its drafts has one estimate
(prior 0.7).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorad.protocol import ErrorCode, ProtocolError
from lorad.protocol.args import OpArgs

from . import llama
from .ngrams import END, Ngrams, RecentNgrams, agreement

PROBE_EVERY = 8
PROBE_MAX = 64
PROBE_BUDGET = 0.01
"""The share of the steps a draft model's failing probe may cost: where a one-token draft costs
a whole step (as on these CPUs), probes come every 100 steps at least."""
DECAY = 0.9
"""Weight of the acceptance counts of the step before (per step)."""


def lookup_draft(history: list[int], ngram_min: int, ngram_max: int, n: int,
                 longest: int = 16, memory: RecentNgrams | None = None,
                 index: Ngrams | None = None) -> tuple[list[int], int, bool]:
    """Up to ``n`` tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram of ``history`` (sizes ``ngram_max`` down to ``ngram_min``), how many tokens
    (up to ``longest``) before that occurrence agree with the history's end (the longer the
    agreement, the likelier the draft is right), and whether they come from ``memory`` (a
    context's earlier requests: used where it agrees longer than the history itself; of the
    memory's last few occurrences, the one that agrees longest, then the longer draft).
    ``index``: ``history``'s own index, when the caller keeps one."""
    if n <= 0:
        return [], 0, False
    if index is None or index.tokens is not history:
        index = Ngrams(range(ngram_min, ngram_max + 1), history)
    size = len(history)
    for g in range(min(ngram_max, size), ngram_min - 1, -1):
        tail = tuple(history[size - g:])
        best: tuple[int, list[int], bool] | None = None
        if (start := index.find(tail)) is not None:
            best = (agreement(history, start, g, history, longest),
                    history[start + g:start + g + n], False)
        recalled: tuple[int, list[int], bool] | None = None
        for at in memory.starts(tail) if memory is not None else ():
            found = memory.tokens[at + g:at + g + n]
            if END in found:  # an earlier output ends there: what follows is another request
                found = found[:found.index(END)]
            matched = agreement(memory.tokens, at, g, history, longest)
            if found and (recalled is None
                          or (matched, len(found)) >= (recalled[0], len(recalled[1]))):
                recalled = (matched, found, True)  # the longest agreement; then draft; newest
        if recalled is not None and (best is None or recalled[0] > best[0]):
            best = recalled
        if best is not None:
            return best[1], best[0], best[2]
    return [], 0, False


MATCH_BUCKETS = (1, 2, 4, 8, 16)
"""Agreement lengths (:func:`lookup_draft`) from which each acceptance estimate applies."""
BUCKET_PRIORS = (0.3, 0.45, 0.7, 0.85, 0.98)
"""The prior acceptance of each bucket, with the weight of two draft tokens (the module's
docstring says what was measured)."""
WIDE_PRIOR = 0.5
"""The prior of every bucket when the step is shared with other sequences (a wrong guess then
costs each of them): drafting there waits until the context's own judged tokens show it pays."""
LENGTH_WEIGHT = 2.0
"""How many judged tokens of one agreement length weigh as much as its bucket's estimate."""
LONGEST = MATCH_BUCKETS[-1]
"""Agreement is counted up to this length (:func:`lookup_draft`'s ``longest``)."""


def _bucket(matched: int) -> int:
    return max(bisect.bisect_right(MATCH_BUCKETS, matched) - 1, 0)


def chain_probs(logits: np.ndarray, p: llama.SamplingParams) -> np.ndarray:
    """The distribution ``llama.Sampler`` samples from for ``logits`` (temperature > 0):
    top-k, then top-p and min-p on what is left, then temperature, then softmax."""
    x = logits.astype(np.float64)
    n = x.shape[0]
    order = np.argsort(-x, kind="stable")
    keep = order[: p.top_k] if 0 < p.top_k < n else order
    if p.top_p < 1.0:
        probs = np.exp(x[keep] - x[keep[0]])
        cum = np.cumsum(probs / probs.sum())
        keep = keep[: int(np.searchsorted(cum, p.top_p)) + 1]  # include the crossing token
    if p.min_p > 0.0:
        keep = keep[x[keep] >= x[keep[0]] + np.log(p.min_p)]
    z = x[keep] / p.temperature
    w = np.exp(z - z.max())
    out = np.zeros(n)
    out[keep] = w / w.sum()
    return out


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def verify(rows: np.ndarray, draft: list[int], qs: list[np.ndarray] | None,
           params: llama.SamplingParams | None, rng: np.random.Generator) -> list[int]:
    """The tokens a verification step produces: accepted draft tokens, then one more.

    ``rows[i]`` are the target's logits after the i-th token of ``[prev, *draft]``; ``qs`` the
    draft's distributions (None: deterministic drafts); ``params`` None means greedy.
    """
    out: list[int] = []
    for i, d in enumerate(draft):
        if params is None:
            token = int(rows[i].argmax())  # as llama.cpp's greedy sampler
            out.append(token)
            if token != d:
                return out
            continue
        p = chain_probs(rows[i], params)
        q_d = 1.0 if qs is None else float(qs[i][d])
        if q_d > 0 and rng.random() < min(1.0, p[d] / q_d):
            out.append(d)
            continue
        if qs is None:
            residual = p.copy()
            residual[d] = 0.0
        else:
            residual = np.maximum(p - qs[i], 0.0)
        out.append(sample(residual if residual.sum() > 0 else p, rng))
        return out
    last = rows[len(draft)]
    out.append(int(last.argmax()) if params is None else sample(chain_probs(last, params), rng))
    return out


class DraftModel:
    """A draft model's own llama context, kept in step with the target's history."""

    def __init__(self, ctx: llama.Context, p_min: float) -> None:
        self.ctx = ctx
        self.p_min = p_min

    def propose(self, history: list[int], n: int, params: llama.SamplingParams | None,
                rng: np.random.Generator) -> tuple[list[int], list[np.ndarray] | None]:
        if n <= 0:
            return [], None
        ctx = self.ctx
        if len(history) + n > ctx.n_ctx:
            return [], None
        ctx.eval_prompt(history, lambda: False)  # reuses the common prefix of its KV cache
        tokens: list[int] = []
        qs: list[np.ndarray] = []
        for i in range(n):
            logits = ctx.logits()
            if params is None:
                z = logits.astype(np.float64)
                token = int(z.argmax())
                prob = 1.0 / np.exp(z - z[token]).sum()
            else:
                # Draw from q restricted to tokens of probability >= p_min (renormalised), and
                # verify against that same distribution: exactness needs the q drawn from.
                q = chain_probs(logits, params)
                q[q < self.p_min] = 0.0
                if q.sum() <= 0:
                    break
                q /= q.sum()
                token, prob = sample(q, rng), 1.0
                qs.append(q)
            if prob < self.p_min:
                break
            tokens.append(token)
            if i + 1 < n:
                ctx.decode_token(token)
        return tokens, (qs if params is not None else None)


@dataclass
class Acceptance:
    """Judged draft tokens, accepted (``hits``) of all (``trials``), per group of agreement
    lengths (:data:`MATCH_BUCKETS`, starting from the priors) and per agreement length (an
    n-gram draft's); earlier counts decay once a step. A context keeps its n-gram drafts' from
    one request to the next."""

    hits: list[float] = field(default_factory=lambda: [2 * p for p in BUCKET_PRIORS])
    trials: list[float] = field(default_factory=lambda: [2.0] * len(BUCKET_PRIORS))
    length_hits: list[float] = field(default_factory=lambda: [0.0] * (LONGEST + 1))
    length_trials: list[float] = field(default_factory=lambda: [0.0] * (LONGEST + 1))
    """Per agreement length (index: the length, 1 to ``LONGEST``)."""
    prior_weight: list[float] = field(default_factory=lambda: [2.0] * len(BUCKET_PRIORS))
    """What is left of each bucket's prior in its counts (it decays with them)."""


@dataclass
class Drafter:
    """Per-request drafting state: parameters, acceptance estimates (counts a context keeps
    for its n-gram drafts) and counters."""

    mode: str
    max_draft: int
    ngram_min: int = 1
    ngram_max: int = 3
    source: DraftModel | None = None
    adaptive: bool = True
    """False: always draft ``max_draft`` tokens."""
    cost: Callable[[int], float] = lambda d: 1.0 + 0.5 * d
    """The relative cost of a step with ``d`` draft tokens (the engine's estimate: the
    scheduler sets this and the three below when the generation starts drafting)."""
    whole: Callable[[int], bool] = lambda d: True
    """Whether a step with ``d`` draft tokens is of a size on the engine's grid: the depth is
    one of those, or the whole proposal where it is shorter than ``max_draft``."""
    step_seconds: Callable[[], float | None] = lambda: None
    """What a step without draft takes (for a draft model's own time, relative to it)."""
    width: Callable[[], int] = lambda: 1
    """The sequences the step is shared with, this one included (the engine's): what a draft
    adds to the step's time, every one of them waits for."""
    draft_seconds: float | None = None
    """A draft model's time per drafted token (recent steps weighing more)."""
    depth: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    memory: RecentNgrams | None = None
    """The context's earlier requests (n-gram drafts only)."""
    memory_drafted: int = 0
    _index: Ngrams = field(default_factory=lambda: Ngrams(range(0)))
    """The text drafted from (prompt and output), indexed for n-gram drafts."""
    _from_memory: bool = False
    acceptance: Acceptance = field(default_factory=Acceptance)
    """The acceptance estimates' counts (a context's, for n-gram drafts)."""
    _bucket: int = 2
    """The estimate that applies to the draft's first token (a draft model's is always the
    middle one, prior 0.7, for every token); n-gram drafts pick theirs by agreement length."""
    _matched: int | None = None
    """How many tokens the draft's first token agrees over (None: every token of the draft
    has the estimate ``_bucket``, as a draft model's)."""
    _found: list[int] = field(default_factory=list)
    """The last n-gram proposal, drafted or not: its token after the drafted ones is judged
    against the token the step produces."""
    _room: int | None = None
    """The most tokens this step may draft (a draft of all of them finishes the request where
    ``max_tokens`` is what bounds it)."""
    _probe_in: int = 1
    """A draft model's chances to probe before its next probe (the first chance probes)."""
    _probe_every: int = PROBE_EVERY
    _probing: bool = False

    def p_accept(self, bucket: int | None = None) -> float:
        """The estimate of a bucket of agreement lengths (default: the draft's first token's)."""
        b = self._bucket if bucket is None else bucket
        return self.acceptance.hits[b] / self.acceptance.trials[b]

    def p_wide(self, bucket: int | None = None) -> float:
        """The same with the prior's share counted at ``WIDE_PRIOR`` (see :meth:`_estimates`)."""
        b = self._bucket if bucket is None else bucket
        a = self.acceptance
        w = a.prior_weight[b]
        return (a.hits[b] - w * BUCKET_PRIORS[b] + w * WIDE_PRIOR) / a.trials[b]

    def length_estimate(self, length: int) -> float:
        """The chance that a draft token agreeing over ``length`` tokens is accepted (given its
        predecessors were): its own length's record, drawn toward its bucket's estimate."""
        m = min(max(length, 1), LONGEST)
        a = self.acceptance
        return ((a.length_hits[m] + LENGTH_WEIGHT * self.p_accept(_bucket(m)))
                / (a.length_trials[m] + LENGTH_WEIGHT))

    def _length(self, i: int) -> int:
        """The agreement length of an n-gram draft's token ``i`` (from 0), once its
        predecessors are accepted."""
        assert self._matched is not None
        return min(self._matched + i, LONGEST)

    def _lengths(self, n: int) -> list[int | None]:
        """The agreement length of each token of an ``n``-token draft (None: a draft model's)."""
        if self._matched is None:
            return [None] * n
        return [self._length(i) for i in range(n)]

    def _estimates(self, n: int) -> list[float]:
        """The estimate of each token of an ``n``-token draft (those past ``LONGEST`` share
        one, computed once)."""
        if self._matched is None:
            ps = [min(self.p_accept(), 0.999)] * n
        else:
            head = [min(self.length_estimate(self._length(i)), 0.999)
                    for i in range(min(n, LONGEST - self._matched))]
            ps = head + [min(self.length_estimate(LONGEST), 0.999)] * (n - len(head))
        if self.width() > 1 and ps:
            # Beside other sequences a wrong guess costs each of them, so no estimate rests
            # on an optimistic prior: no token is trusted more than the first, whose bucket
            # every step judges (drafted or not), with its prior counted at WIDE_PRIOR (the
            # longer agreements of a draft's later tokens are judged only when drafted that
            # deep, and their priors, up to 0.98, are what a copy gives, not open text).
            first = min(ps[0], self.p_wide())
            ps = [min(p, first) for p in ps]
        return ps

    def _best(self, ps: list[float]) -> int:
        """The depth (0 included, at most ``len(ps)``) with the most expected tokens per unit
        of time, where ``ps[i]`` is the chance that draft token ``i`` is accepted once its
        predecessors are. The time is the batch's: in a step of ``width`` sequences, a draft
        that makes the step 10 % longer costs each of them 10 %, so it must give 10 % of a
        token for each of them (a ``width`` times higher bar than alone)."""
        n = min(self.max_draft, len(ps))
        if n <= 0:
            return 0
        per_draft_token = 0.0  # a draft model's own decoding, in steps of the target
        step = self.step_seconds()
        if self.draft_seconds is not None and step:
            per_draft_token = self.draft_seconds / step

        width = max(1, self.width())

        def price(d: int) -> float:
            """A step with d draft tokens, the draft's own decoding too, in steps of this
            sequence, counting the time it adds for each of the ``width`` sequences in the
            step: drafting pays only where the batch as a whole gets more tokens a second."""
            return 1.0 + width * (self.cost(d) + d * per_draft_token - 1.0)

        short = n if n < self.max_draft else 0  # the whole proposal, or all the room left
        top = max(ps[:n])
        tail = top / (1 - top)  # what an endless draft adds per unit of the chance to get there
        best, best_value = 0, 1.0
        expected, reach = 1.0, 1.0  # tokens expected so far; the chance to reach the next
        for d in range(1, n + 1):
            cost = price(d)
            if (expected + reach * tail) / cost <= best_value * 1.001:
                break  # costs hardly fall as d grows (odd sizes): no deeper draft does better
            reach *= ps[d - 1]
            expected += reach
            value = expected / cost
            if not self.whole(d) and d != short:
                continue  # a step size kernels handle with a tile part-used
            if value > best_value * 1.001:
                best, best_value = d, value
        if 0 < best < n == self._room and (self.whole(n) or n == short):
            # This step could finish the request: a shorter draft leaves the rest (once it is
            # accepted) to one more step, counted with it.
            rest = n - best
            tokens, reach = self._outlook(ps, best)
            split = (tokens + reach * rest) / (price(best) + reach * price(rest - 1))
            if self._outlook(ps, n)[0] / price(n) > split:
                return n
        return best

    @staticmethod
    def _outlook(ps: list[float], d: int) -> tuple[float, float]:
        """The tokens a ``d``-token draft's step is expected to give, and the chance that all
        of the draft is accepted."""
        tokens, reach = 1.0, 1.0
        for p in ps[:d]:
            reach *= p
            tokens += reach
        return tokens, reach

    def _interval(self) -> int:
        """Steps to the next probe: the current interval, or more where a probe is dear."""
        dear = math.ceil(max(self.cost(1) - 1.0, 0.0) * max(1, self.width()) / PROBE_BUDGET)
        return max(self._probe_every, min(dear, 4 * PROBE_MAX))

    def choose_depth(self, limit: int) -> int:
        """The draft length that maximises expected tokens per unit of step time."""
        n = min(self.max_draft, limit)
        if not self.adaptive or n <= 0:
            return max(n, 0)
        best = self._best(self._estimates(n))
        if (best == 0 and self.mode == "draft_model"
                and self._best([min(self._p_if_accepted(), 0.999)] * n) > 0):
            self._probe_in -= 1  # a chance where an accepted probe would make drafting pay
            if self._probe_in <= 0:
                self._probe_in = self._interval()
                self._probing = True
                return 1
        return best

    def _p_if_accepted(self) -> float:
        """The current estimate after one more accepted draft token."""
        b = self._bucket
        return (DECAY * self.acceptance.hits[b] + 1) / (DECAY * self.acceptance.trials[b] + 1)

    @property
    def history(self) -> list[int]:
        """The prompt and the output so far."""
        return self._index.tokens

    @property
    def sizes(self) -> range:
        """The n-gram sizes drafted from (none for a draft model)."""
        return range(self.ngram_min, self.ngram_max + 1) if self.source is None else range(0)

    def start(self, prompt: list[int]) -> None:
        """Draft from ``prompt`` on, indexed for n-gram drafts (cost: one dictionary entry per
        token and n-gram size; none for a draft model)."""
        self._index = Ngrams(self.sizes, prompt)

    def feed(self, token: int) -> None:
        """One more token of output."""
        self._index.append(token)

    def plan(self, limit: int) -> int:
        """A draft model's next depth (0: no draft this step), chosen without touching its
        context: the caller hops to a thread only to :meth:`propose`."""
        self.steps += 1
        self._room = limit
        self.depth = self.choose_depth(limit)
        return self.depth

    def propose(self, depth: int, params: llama.SamplingParams | None,
                rng: np.random.Generator) -> tuple[list[int], list[np.ndarray] | None]:
        """A draft model's draft of ``depth`` tokens (in a worker thread), timed."""
        assert self.source is not None
        started = time.perf_counter()
        draft, qs = self.source.propose(self.history, depth, params, rng)
        if draft:
            spent = (time.perf_counter() - started) / len(draft)
            self.draft_seconds = (spent if self.draft_seconds is None
                                  else 0.7 * self.draft_seconds + 0.3 * spent)
        return draft, qs

    def draft(self, limit: int) -> list[int]:
        """The next n-gram draft (at most ``limit`` tokens: room left in max_tokens and
        n_ctx), inline; a draft model's go through :meth:`plan` and :meth:`propose`."""
        assert self.source is None, "a draft model drafts through plan and propose"
        self.steps += 1
        self._room = limit
        found, matched, self._from_memory = lookup_draft(
            self.history, self.ngram_min, self.ngram_max, min(self.max_draft, limit),
            memory=self.memory, index=self._index)
        self._found = found
        if not found:
            self.depth = 0
            return []
        self._bucket, self._matched = _bucket(matched), matched
        self.depth = depth = self.choose_depth(len(found))
        return found[:depth]

    def record(self, drafted: int, accepted: int, following: int | None = None) -> None:
        """A verified draft: ``accepted`` of its ``drafted`` tokens were kept, and the step
        produced ``following`` after them (the n-gram proposal's next token is judged by it)."""
        self.drafted += drafted
        self.accepted += accepted
        if self._from_memory:
            self.memory_drafted += drafted
        judged = [(m, i < accepted)  # the tokens up to the rejected one
                  for i, m in enumerate(self._lengths(min(drafted, accepted + 1)))]
        if (following is not None and accepted == drafted and len(self._found) > drafted
                and self._matched is not None):
            judged.append((self._length(drafted), self._found[drafted] == following))
        self._judge(judged)
        if self._probing:
            self._probing = False
            self._probe_every = PROBE_EVERY if accepted else min(PROBE_MAX,
                                                                 self._probe_every * 2)
            self._probe_in = self._interval()

    def _judge(self, judged: list[tuple[int | None, bool]]) -> None:
        """Count judged tokens (agreement length or None, accepted) in their estimates; the
        earlier counts of an estimate decay once a step."""
        buckets: dict[int, list[bool]] = {}
        lengths: dict[int, list[bool]] = {}
        for m, ok in judged:
            buckets.setdefault(self._bucket if m is None else _bucket(m), []).append(ok)
            if m is not None:
                lengths.setdefault(m, []).append(ok)
        a = self.acceptance
        for counts, hits, trials in ((buckets, a.hits, a.trials),
                                     (lengths, a.length_hits, a.length_trials)):
            for k, oks in counts.items():
                hits[k] = DECAY * hits[k] + sum(oks)
                trials[k] = DECAY * trials[k] + len(oks)
        for k in buckets:
            a.prior_weight[k] *= DECAY

    def metrics(self) -> dict[str, Any]:
        return {
            "speculative": True,
            "speculative_mode": self.mode,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
            "memory_drafted_tokens": self.memory_drafted,
        }


OFF_METRICS = {"speculative": False, "speculative_mode": None, "drafted_tokens": 0,
               "accepted_tokens": 0, "acceptance_rate": None, "memory_drafted_tokens": 0}


def refuse(spec: dict[str, Any], reason: str, message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.SPECULATIVE_UNSUPPORTED, f"speculative: {message}",
                         field="speculative", reason=reason, mode=spec["mode"], **details)


def check_request(spec: dict[str, Any], args: OpArgs, can_roll_back: bool) -> None:
    """Raise ``speculative_unsupported`` for a combination that cannot run exactly."""
    if args.grammar is not None or args.repeat_penalty != 1.0:
        raise refuse(spec, "sampler_not_supported", "grammar and repeat_penalty are not "
                     "supported with speculative decoding; pass speculative=False")
    if not can_roll_back:
        raise refuse(spec, "no_rollback", "this model's memory (recurrent or hybrid) cannot "
                     "roll back rejected draft tokens")


def check_vocabularies(target: llama.Model, draft: llama.Model) -> None:
    """Raise ``speculative_unsupported`` unless ``draft`` tokenizes exactly like ``target``."""
    spec = {"mode": "draft_model"}
    if target.n_vocab != draft.n_vocab:
        raise refuse(spec, "vocab_mismatch", f"the draft model's vocabulary has {draft.n_vocab} "
                     f"tokens, the target's {target.n_vocab}",
                     target_vocab=target.n_vocab, draft_vocab=draft.n_vocab)
    if (target.add_bos, target.bos, target.eos) != (draft.add_bos, draft.bos, draft.eos):
        raise refuse(spec, "vocab_mismatch", "the draft model's special tokens differ")
    for i in range(target.n_vocab):
        if target.token_text(i) != draft.token_text(i):
            raise refuse(spec, "vocab_mismatch", f"token {i} is {target.token_text(i)!r} in the "
                         f"target and {draft.token_text(i)!r} in the draft model", token=i)
