"""``lorad chat``: an interactive chat on one context, like ``ollama run``.

:class:`ChatSession` holds the conversation and drives a sync :class:`~.sync.Context`: each line
is a message (the whole history goes with it to ``chat``, the reply streams to the writer) or a
slash command (``/help``). Terminal I/O is injected — :meth:`ChatSession.run` takes an iterable
of input lines and the session writes to any text stream — so it runs without a TTY;
:func:`terminal_lines` is the interactive input.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from .errors import LoradError
from .sync import Context, Stream

HELP = """\
/lora NAME_OR_PATH [SCALE]  add an adapter to the context's stack, or change its scale
/unlora NAME_OR_PATH        remove an adapter from the stack
/loras                      show the stack
/noloras                    remove every adapter (back to the base model)
/system [TEXT]              set the system message (without TEXT: remove it)
/clear                      forget the conversation (the stack stays)
/help                       this list
/bye, /quit                 end the session (or Ctrl-D)
Ctrl-C during a reply cancels that reply."""

Message = dict[str, str]


def format_stack(stack: list[dict[str, Any]]) -> str:
    """An adapter stack as lines of ``index  scale  ref``."""
    if not stack:
        return "(no adapters: base model)"
    return "\n".join(f"{i}\t{e['scale']:g}\t{e['ref']}" for i, e in enumerate(stack))


class ChatSession:
    """A conversation on ``ctx``: a system message, the user/assistant turns, and commands
    that change the context's adapter stack.

    ``params`` are ``chat``'s arguments for every turn (``max_tokens``, ``temperature``,
    ``seed``, ``template``, ...; ``None`` values are left out). With ``verbose`` a stats line
    follows each reply. With ``catch_sigint`` (the terminal) Ctrl-C during a reply cancels it
    instead of ending the program; a second Ctrl-C abandons the reply at once.
    """

    def __init__(self, ctx: Context, out: TextIO, *, system: str | None = None,
                 verbose: bool = False, catch_sigint: bool = False, **params: Any) -> None:
        self.ctx = ctx
        self.out = out
        self.system = system or None
        self.history: list[Message] = []
        self.verbose = verbose
        self.catch_sigint = catch_sigint
        self.params = {k: v for k, v in params.items() if v is not None}
        self._interrupted = False
        self._commands: dict[str, Callable[[str], bool]] = {
            "/lora": self._cmd_lora, "/unlora": self._cmd_unlora, "/loras": self._cmd_loras,
            "/noloras": self._cmd_noloras, "/system": self._cmd_system,
            "/clear": self._cmd_clear, "/help": self._cmd_help,
            "/bye": self._cmd_bye, "/quit": self._cmd_bye,
        }

    # -- driving it ----------------------------------------------------------------------------
    def run(self, lines: Iterable[str]) -> None:
        """Handle ``lines`` until they end, or ``/bye``."""
        for line in lines:
            if not self.handle(line):
                break

    def handle(self, line: str) -> bool:
        """One input line: a command or a message. False when the session is to end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            name, _, rest = text.partition(" ")
            command = self._commands.get(name)
            if command is None:
                self._line(f"error: unknown command {name} (/help lists the commands)")
                return True
            return command(rest.strip())
        self.send(text)
        return True

    def messages(self, user: str | None = None) -> list[Message]:
        """What ``chat`` gets: the system message, the history, then ``user`` (if given)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        out += self.history
        if user is not None:
            out.append({"role": "user", "content": user})
        return out

    def send(self, text: str) -> str | None:
        """One turn: stream the reply to ``text``; on success it joins the history and is
        returned. An error or a cancel leaves the history as it was (and returns None)."""
        self._interrupted = False
        messages = self.messages(text)
        stream: Stream | None = None
        at_line_start = True
        try:
            with self._sigint_cancels():
                stream = self.ctx.chat(messages, **self.params)
                for chunk in stream:
                    if chunk.text:
                        self.out.write(chunk.text)
                        self._flush()
                        at_line_start = chunk.text.endswith("\n")
                    if self._interrupted:
                        stream.cancel()
        except LoradError as exc:
            self._line(f"error: {exc.code}: {exc.message}", newline_first=not at_line_start)
            return None
        except KeyboardInterrupt:  # the second Ctrl-C: closing the stream cancels it
            self._line("[cancelled]", newline_first=not at_line_start)
            return None
        finally:
            if stream is not None:
                stream.close()
        assert stream is not None
        if not at_line_start:
            self.out.write("\n")
        if stream.finish_reason == "cancelled":
            self._line("[cancelled]")
            return None
        if self.verbose:
            m = stream.metrics
            self._line(f"[{stream.finish_reason}] {m.get('generated_tokens')} tokens, "
                       f"{m.get('generation_tokens_per_s')} tok/s")
        self.history += [messages[-1], {"role": "assistant", "content": stream.text}]
        self._flush()
        return stream.text

    def interrupt(self) -> None:
        """Cancel the reply being streamed (what Ctrl-C does); the session goes on."""
        self._interrupted = True

    # -- commands: each returns False to end the session -----------------------------------------
    def _cmd_lora(self, rest: str) -> bool:
        path, scale = rest, 1.0
        head, _, tail = rest.rpartition(" ")
        if head.strip():
            try:
                path, scale = head.strip(), float(tail)
            except ValueError:
                pass
        if not path:
            self._line("error: usage: /lora NAME_OR_PATH [SCALE]")
            return True
        return self._stack_op(lambda: self.ctx.set_lora(path, scale))

    def _cmd_unlora(self, rest: str) -> bool:
        if not rest:
            self._line("error: usage: /unlora NAME_OR_PATH")
            return True
        return self._stack_op(lambda: self.ctx.remove_lora(rest))

    def _cmd_loras(self, rest: str) -> bool:
        return self._stack_op(self.ctx.loras)

    def _cmd_noloras(self, rest: str) -> bool:
        return self._stack_op(self.ctx.clear_loras)

    def _cmd_system(self, rest: str) -> bool:
        self.system = rest or None
        self._line("system message set" if rest else "system message removed")
        return True

    def _cmd_clear(self, rest: str) -> bool:
        self.history.clear()
        self._line("history cleared")
        return True

    def _cmd_help(self, rest: str) -> bool:
        self._line(HELP)
        return True

    def _cmd_bye(self, rest: str) -> bool:
        return False

    # -- helpers -----------------------------------------------------------------------------
    def _stack_op(self, op: Callable[[], list[dict[str, Any]]]) -> bool:
        try:
            stack = op()
        except LoradError as exc:
            self._line(f"error: {exc.code}: {exc.message}")
        else:
            self._line(format_stack(stack))
        return True

    def _line(self, text: str, newline_first: bool = False) -> None:
        self.out.write(("\n" if newline_first else "") + text + "\n")
        self._flush()

    def _flush(self) -> None:
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()

    @contextmanager
    def _sigint_cancels(self) -> Iterator[None]:
        """While a reply streams: the first Ctrl-C asks for a cancel (seen at the next chunk),
        a second one raises KeyboardInterrupt (which closes, and so cancels, the stream)."""
        if not self.catch_sigint or threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum: int, frame: object) -> None:
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def terminal_lines(prompt: str = ">>> ", stdin: TextIO | None = None,
                   out: TextIO | None = None) -> Iterator[str]:
    """Input lines: with a prompt and line editing (``readline``, if there is one) on a
    terminal, where Ctrl-C clears the line; plain lines from a pipe. Ends at EOF (Ctrl-D)."""
    stdin = sys.stdin if stdin is None else stdin
    out = sys.stdout if out is None else out
    if not stdin.isatty():
        for line in stdin:
            yield line.rstrip("\r\n")
        return
    try:
        import readline  # noqa: F401  (input() edits lines with it once imported)
    except ImportError:
        pass
    while True:
        try:
            line = input(prompt)
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D or /bye ends the session)\n")
            continue
        yield line
