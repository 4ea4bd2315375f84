"""The chat-template worker process: renders untrusted Jinja chat templates, nothing else.

Run as a script (``python -I template_worker.py MEMORY_BYTES OUTPUT_CHARS DAEMON_PID``) by
:mod:`lorad.daemon.templates`, never imported by the daemon: it imports only the standard
library, jinja2 and msgpack, so that it starts fast. Requests and replies are msgpack maps,
each preceded by its length (4 bytes, big-endian), on stdin and stdout; the first reply,
``{"ready": true}``, says that it has started.

Whatever a template does, it cannot reach the daemon: it runs in Jinja's immutable sandbox, in
its own process, under an address-space limit; its output is cut at ``OUTPUT_CHARS``; the
daemon kills the process when a render takes too long. The process ends with its parent (it
checks every half second).
"""

from __future__ import annotations

import os
import resource
import struct
import sys
import threading
import time
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import msgpack


class RaisedByTemplate(Exception):
    """The template called ``raise_exception(message)``."""


class OutputTooLarge(Exception):
    pass


def _raise(message: Any) -> None:
    raise RaisedByTemplate(str(message))


class StrictSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, where reaching for an unsafe attribute is an error rather
    than a silent undefined value."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.sandbox.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


class Renderer:
    def __init__(self, max_output: int) -> None:
        self.max_output = max_output
        self.env = StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                                 extensions=[jinja2.ext.loopcontrols])
        self.compiled: dict[str, jinja2.Template] = {}

    def template(self, source: str) -> jinja2.Template:
        tmpl = self.compiled.get(source)
        if tmpl is None:
            if len(self.compiled) >= 32:
                self.compiled.clear()
            tmpl = self.compiled[source] = self.env.from_string(source)
        return tmpl

    def render(self, request: dict[str, Any]) -> str:
        tmpl = self.template(request["source"])
        parts: list[str] = []
        size = 0
        for part in tmpl.generate(messages=request["messages"],
                                  add_generation_prompt=request["add_generation_prompt"],
                                  bos_token=request["bos_token"], eos_token=request["eos_token"],
                                  tools=request.get("tools"), raise_exception=_raise):
            size += len(part)
            if size > self.max_output:
                raise OutputTooLarge
            parts.append(part)
        return "".join(parts)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"text": self.render(request)}
        except RaisedByTemplate as exc:
            return {"error": "raised", "message": str(exc)}
        except OutputTooLarge:
            return {"error": "output", "message": f"the output exceeds {self.max_output} "
                                                  "characters"}
        except MemoryError:
            self.compiled.clear()
            return {"error": "memory", "message": "the template used too much memory"}
        except RecursionError:
            return {"error": "failed", "message": "maximum recursion depth exceeded"}
        except jinja2.TemplateError as exc:
            return {"error": "failed", "message": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # any other failure of the template's own code
            return {"error": "failed", "message": f"{type(exc).__name__}: {exc}"}


def _read_exactly(stream: Any, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _end_with(parent: int) -> None:
    """End this process once ``parent`` has ended (it is then reparented), whatever the main
    thread is rendering. Not ``PR_SET_PDEATHSIG``: that fires when the parent *thread* ends,
    and the daemon starts workers from trio's worker threads, which end after 10 s idle (an
    idle worker was killed, and the next chat request failed)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def main(argv: list[str]) -> int:
    memory, max_output, parent = int(argv[1]), int(argv[2]), int(argv[3])
    threading.Thread(target=_end_with, args=(parent,), daemon=True).start()
    os.nice(19)  # a template spinning on a core yields it to the daemon's token work
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    renderer = Renderer(max_output)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    ready = msgpack.packb({"ready": True})  # its start is not a render's time
    stdout.write(struct.pack(">I", len(ready)) + ready)
    stdout.flush()
    while True:
        head = _read_exactly(stdin, 4)
        if head is None:
            return 0
        body = _read_exactly(stdin, struct.unpack(">I", head)[0])
        if body is None:
            return 0
        reply = msgpack.packb(renderer.handle(msgpack.unpackb(body)))
        stdout.write(struct.pack(">I", len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
