"""Turning token bytes into text deltas: never a broken UTF-8 sequence, stop sequences cut."""

from __future__ import annotations

import codecs


class TextAssembler:
    """Feed token bytes; get back the text that is safe to emit.

    Incomplete UTF-8 sequences wait for the next token. Text that could still become the start
    of a stop sequence is held back; once a stop sequence appears, the text is cut before it.
    """

    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(data)
        if not self._stop:
            self._held = ""
            return text
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        """Whatever is left at the end (held text, and a dangling partial sequence as U+FFFD)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text
