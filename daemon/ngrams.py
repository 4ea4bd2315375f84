"""n-gram lookups for ``prompt_lookup`` drafts: an index of where each n-gram of a token
sequence last occurred (or its last few occurrences), and a context's memory of what its
earlier requests generated.

A lookup is a dictionary read, not a scan of the history: drafting on a long prompt costs the
same per step as on a short one. Appending a token updates one entry per n-gram size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MEMORY_TOKENS = 4096
"""At most this many tokens of a context's earlier requests are kept for drafting (indexed for
n-grams of 1-3 tokens: at most ~2 MiB a context)."""
MEMORY_STARTS = 4
"""Starts kept per n-gram in a memory's index: the newest is not always the one to draft from
(an output that loops back to its beginning ends with its prompt's last n-gram, where the
occurrence after the remembered prompt agrees longer and goes on)."""
MEMORY_PROMPT = 16
"""The tokens of each earlier prompt kept before its output: what led into the output, so
that the same request sent again finds its earlier answer from its first step."""
END = -1
"""Follows each output in a memory (never a token): a draft stops there rather than run on into
another request's prompt, and no agreement is counted across it."""


class Ngrams:
    """A token sequence and, per n-gram size in ``sizes``, the start of each n-gram's last
    occurrence that has a token after it (so a sequence's own suffix is not found in it)."""

    def __init__(self, sizes: range, tokens: Iterable[int] = ()) -> None:
        self.tokens: list[int] = []
        self._last: dict[int, dict[tuple[int, ...], Any]] = {}
        """Per n-gram size: each n-gram's start (a list of starts in :class:`RecentNgrams`)."""
        self.cover(sizes)
        self.extend(tokens)

    def cover(self, sizes: range) -> None:
        """Index the n-grams of these sizes too."""
        for g in sizes:
            if g not in self._last:
                self._last[g] = {}
                self._index(g, 0)

    def _index(self, g: int, old: int) -> None:
        toks, n = self.tokens, len(self.tokens)
        first = max(old - g, 0)  # the n-grams whose next token came after ``old``
        if n - g > first:  # later starts overwrite earlier ones: the last occurrence wins
            grams = zip(*(toks[first + k:n - g + k] for k in range(g)), strict=True)
            self._last[g].update(zip(grams, range(first, n - g), strict=True))

    def extend(self, tokens: Iterable[int]) -> None:
        old = len(self.tokens)
        self.tokens.extend(tokens)
        for g in self._last:
            self._index(g, old)

    def append(self, token: int) -> None:
        toks = self.tokens
        toks.append(token)
        i = len(toks) - 1
        for g, table in self._last.items():
            if i >= g:
                table[tuple(toks[i - g:i])] = i - g

    def covers(self, g: int) -> bool:
        return g in self._last

    def find(self, gram: tuple[int, ...]) -> int | None:
        """Where ``gram`` last started with a token after it, or None."""
        table = self._last.get(len(gram))
        return None if table is None else table.get(gram)

    def __len__(self) -> int:
        return len(self.tokens)


class RecentNgrams(Ngrams):
    """An :class:`Ngrams` that keeps the last ``keep`` starts of each n-gram (for a memory:
    filled in bulk, not token by token on a request's hot path)."""

    def __init__(self, sizes: range, tokens: Iterable[int] = (), keep: int = MEMORY_STARTS) -> None:
        self.keep = keep
        super().__init__(sizes, tokens)

    def _index(self, g: int, old: int) -> None:
        toks, n, table, keep = self.tokens, len(self.tokens), self._last[g], self.keep
        first = max(old - g, 0)
        if n - g <= first:
            return
        grams = zip(*(toks[first + k:n - g + k] for k in range(g)), strict=True)
        for start, gram in enumerate(grams, first):
            if (seen := table.get(gram)) is None:
                table[gram] = [start]
            else:
                seen.append(start)
                if len(seen) > keep:
                    del seen[0]

    def append(self, token: int) -> None:
        self.extend((token,))

    def find(self, gram: tuple[int, ...]) -> int | None:
        return starts[-1] if (starts := self.starts(gram)) else None

    def starts(self, gram: tuple[int, ...]) -> list[int]:
        """Where ``gram`` started with a token after it, the newest last."""
        table = self._last.get(len(gram))
        return [] if table is None else table.get(gram, [])


def agreement(source: list[int], start: int, g: int, history: list[int], longest: int) -> int:
    """How many tokens (``g`` at least, ``longest`` at most) before ``source[start + g]``
    equal the end of ``history``: the longer, the likelier what follows is a copy."""
    matched, end = g, len(history)
    while (matched < longest and start + g - matched - 1 >= 0 and end - matched - 1 >= 0
           and source[start + g - matched - 1] == history[end - matched - 1]):
        matched += 1
    return matched


class Memory:
    """What a context generated in its earlier requests, each output after the last
    ``MEMORY_PROMPT`` tokens of its prompt and before an ``END``, at most ``MEMORY_TOKENS``
    tokens (the oldest half goes when full); indexed on first use by a ``prompt_lookup``
    request."""

    def __init__(self, limit: int = MEMORY_TOKENS) -> None:
        self.limit = limit
        self.tokens: list[int] = []
        self._index: RecentNgrams | None = None

    def add(self, prompt: list[int], output: list[int]) -> None:
        if not output:
            return
        self.tokens += [*prompt[-MEMORY_PROMPT:], *output, END]
        if len(self.tokens) > self.limit:
            self.tokens = self.tokens[-(self.limit // 2):]
            self._index = None

    def pending(self, sizes: range) -> int:
        """What :meth:`index` has to index: tokens times n-gram sizes (to decide on a thread)."""
        if self._index is None:
            return len(self.tokens) * len(sizes)
        new = sum(not self._index.covers(g) for g in sizes)
        return len(self.tokens) * new + (len(self.tokens) - len(self._index)) * len(sizes)

    def index(self, sizes: range) -> RecentNgrams:
        """The memory indexed for n-grams of ``sizes`` (and those indexed before), brought up
        to date: the cost is the tokens added since, and all of them for a size new to it."""
        if self._index is None:
            self._index = RecentNgrams(sizes)
        self._index.cover(sizes)
        self._index.extend(self.tokens[len(self._index):])
        return self._index

    def __len__(self) -> int:
        return len(self.tokens)
