"""The chat-template worker process lives as long as the daemon: not less (a worker started
from a thread that has ended since still renders), not more (it ends once the daemon is
gone)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import msgpack

from lorad.daemon import templates
from lorad.protocol import Limits

REQUEST = {"source": "{{ messages[0]['content'] }}!", "messages": [{"role": "user",
                                                                     "content": "hi"}],
           "add_generation_prompt": True, "bos_token": "", "eos_token": ""}


SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def _call(proc: subprocess.Popen, request: dict) -> dict:
    body = msgpack.packb(request)
    proc.stdin.write(struct.pack(">I", len(body)) + body)
    proc.stdin.flush()
    size = struct.unpack(">I", proc.stdout.read(4))[0]
    return msgpack.unpackb(proc.stdout.read(size))


def _start_worker() -> subprocess.Popen:
    """A worker process, once it has said it is ready (its first message)."""
    proc = subprocess.Popen([sys.executable, "-I", str(templates.WORKER), str(1 << 30), "1000",
                             str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        size = struct.unpack(">I", proc.stdout.read(4))[0]
        assert msgpack.unpackb(proc.stdout.read(size)) == {"ready": True}
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_outlives_the_thread_that_started_it() -> None:
    started: list[subprocess.Popen] = []
    answers: list[dict] = []

    def start() -> None:
        started.append(_start_worker())
        answers.append(_call(started[0], REQUEST))  # up and running before the thread ends

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()  # trio's worker threads end after 10 s idle: the daemon's workers saw this
    proc = started[0]
    try:
        assert answers == [{"text": "hi!"}]
        assert _call(proc, REQUEST) == {"text": "hi!"}
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_ends_with_its_daemon() -> None:
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys
        import msgpack, struct
        w = subprocess.Popen([sys.executable, "-I", {str(templates.WORKER)!r}, "1073741824",
                              "1000", str(os.getpid())], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)  # its messages, "ready" first, unread
        body = msgpack.packb({{**{REQUEST!r}, "source": {SPIN!r}}})
        w.stdin.write(struct.pack(">I", len(body)) + body)
        w.stdin.flush()  # a render that does not end: the worker reads nothing more
        print(w.pid, flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    assert _alive(worker)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for the condition, bounded
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive


async def test_an_idle_worker_that_ended_is_replaced_without_failing_a_request() -> None:
    renderer = templates.TemplateRenderer(Limits())
    try:
        variables = {k: v for k, v in REQUEST.items() if k != "source"}
        assert await renderer.render(REQUEST["source"], **variables) == "hi!"
        (idle,) = renderer._idle
        idle.process.kill()
        await idle.process.wait()
        assert await renderer.render(REQUEST["source"], **variables) == "hi!"
        assert len(renderer._idle) == 1 and renderer._idle[0] is not idle
    finally:
        await renderer.aclose()
