"""``lorad chat``: the session logic through a real daemon, and the command end to end."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import Client, Context
from lorad.client.chat import ChatSession, terminal_lines

GREEDY = {"max_tokens": 12, "temperature": 0.0, "seed": 1}


@pytest.fixture(scope="module")
def adapter(models_dir: Path) -> Path:
    """A tiny adapter for ``tiny_model``, also known to the daemon by its name ``chat-a``."""
    base = tinymodels.tiny_llama_tensors(seed=0)
    (models_dir / "chat-adapters").mkdir(exist_ok=True)
    return tinymodels.write_lora(models_dir / "chat-adapters" / "chat-a.gguf", base, rank=4,
                                 alpha=8, seed=1, std=0.3).path


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_model: Path,
           adapter: Path) -> Iterator[DaemonProcess]:
    """This module's daemon (overrides conftest's): with an adapter directory."""
    workdir = tmp_path_factory.mktemp("chat-daemon")
    d = start_daemon(workdir, [models_dir], "--adapter-dir", str(adapter.parent))
    yield d
    assert d.stop() == 0, d.log()
    assert '"level": "error"' not in d.log(), d.log()


@pytest.fixture
def ctx(client: Client, tiny_model: Path) -> Iterator[Context]:
    with client.create_context(tiny_model, n_ctx=512) as c:
        yield c


def session(ctx: Context, out: io.StringIO, **params) -> ChatSession:
    return ChatSession(ctx, out, **{**GREEDY, **params})


def shown(reply: str) -> str:
    """A reply as the session prints it: the text, on lines of its own."""
    return reply if reply == "" or reply.endswith("\n") else reply + "\n"


def test_two_turns_carry_the_history(ctx: Context) -> None:
    out = io.StringIO()
    s = session(ctx, out, system="be brief")
    s.run(["hello there", "", "and then?"])
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]
    first, second = s.history[1]["content"], s.history[3]["content"]
    system = {"role": "system", "content": "be brief"}
    turn1 = [system, {"role": "user", "content": "hello there"}]
    assert ctx.chat(turn1, **GREEDY).collect() == first
    turn2 = [*turn1, {"role": "assistant", "content": first},
             {"role": "user", "content": "and then?"}]
    assert ctx.chat(turn2, **GREEDY).collect() == second
    # Without the first turn the answer differs: the check above is about the history.
    alone = [system, {"role": "user", "content": "and then?"}]
    assert ctx.chat(alone, **GREEDY).collect() != second
    assert first and out.getvalue() == shown(first) + shown(second)


def test_clear_and_system(ctx: Context) -> None:
    out = io.StringIO()
    s = session(ctx, out)
    s.run(["hello there", "/system you are a cat"])
    assert len(s.history) == 2 and s.system == "you are a cat"
    s.run(["/clear"])
    assert s.history == [] and "history cleared" in out.getvalue()
    assert s.messages("hi") == [{"role": "system", "content": "you are a cat"},
                                {"role": "user", "content": "hi"}]
    s.run(["/system"])
    assert s.system is None and s.messages() == []


def test_lora_commands_change_the_context_stack(ctx: Context, adapter: Path) -> None:
    out = io.StringIO()
    s = session(ctx, out)
    base_reply = s.send("hello there")
    s.run([f"/lora {adapter} 0.7"])
    assert [(e["ref"], e["scale"]) for e in ctx.loras()] == [(str(adapter), 0.7)]
    assert f"0\t0.7\t{adapter}" in out.getvalue()
    s.run(["/clear"])
    assert s.send("hello there") != base_reply  # the adapter is applied to the turns
    s.run([f"/lora {adapter}", "/loras"])
    assert [(e["ref"], e["scale"]) for e in ctx.loras()] == [(str(adapter), 1.0)]
    assert out.getvalue().endswith(f"0\t1\t{adapter}\n")
    s.run([f"/unlora {adapter}"])
    assert ctx.loras() == []
    assert out.getvalue().endswith("(no adapters: base model)\n")
    s.run(["/lora chat-a -0.5"])  # a name in the daemon's adapter directory
    assert [(e["ref"], e["scale"]) for e in ctx.loras()] == [("chat-a", -0.5)]
    s.run(["/unlora chat-a", "/lora chat-a", "/noloras"])
    assert ctx.loras() == []
    assert out.getvalue().endswith("0\t1\tchat-a\n(no adapters: base model)\n")


def test_errors_print_one_line_and_the_session_goes_on(ctx: Context) -> None:
    out = io.StringIO()
    s = session(ctx, out)
    s.run(["/lora nosuch", "/unlora nosuch", "/frobnicate", "/lora", "hello there"])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("error: lora_file_not_found: ")
    assert lines[1].startswith("error: not_found: ")
    assert lines[2] == "error: unknown command /frobnicate (/help lists the commands)"
    assert lines[3] == "error: usage: /lora NAME_OR_PATH [SCALE]"
    assert "\n".join(lines[4:]) + "\n" == shown(s.history[1]["content"])
    assert ctx.loras() == []


def test_a_failed_turn_leaves_the_history(ctx: Context) -> None:
    out = io.StringIO()
    s = session(ctx, out)
    s.run(["hello there"])
    before = list(s.history)
    s.params["template"] = "no-such-template"
    s.run(["again"])
    assert out.getvalue().splitlines()[-1].startswith("error: bad_request: ")
    assert s.history == before
    del s.params["template"]
    s.run(["again"])
    assert len(s.history) == 4


def test_a_model_without_a_template_is_an_error_line(client: Client, models_dir: Path) -> None:
    model = tinymodels.write_tiny_llama(models_dir / "chat-notemplate.gguf", seed=0,
                                        chat_template=None)
    out = io.StringIO()
    with client.create_context(model, n_ctx=256) as ctx:
        s = session(ctx, out)
        s.run(["hello", "/help", "/bye", "never sent"])
    assert out.getvalue().startswith("error: bad_request: ")
    assert "/noloras" in out.getvalue() and s.history == []


class InterruptingWriter(io.StringIO):
    """Presses Ctrl-C (``session.interrupt()``) when the reply's first text arrives."""

    session: ChatSession

    def write(self, text: str) -> int:
        if not self.getvalue():
            self.session.interrupt()
        return super().write(text)


def test_interrupt_cancels_the_reply_and_keeps_the_session(ctx: Context) -> None:
    params = {**GREEDY, "max_tokens": 40}
    full = ctx.chat([{"role": "user", "content": "hello there"}], **params)
    assert len(list(full)) > 10 and full.finish_reason == "length"
    out = InterruptingWriter()
    # credit 1: the daemon is at most a chunk or two ahead when the cancel reaches it.
    s = session(ctx, out, **params, credit=1)
    out.session = s
    assert s.send("hello there") is None, out.getvalue()
    assert out.getvalue().endswith("\n[cancelled]\n"), out.getvalue()
    shown_text = out.getvalue().removesuffix("[cancelled]\n").rstrip("\n")
    assert full.text.startswith(shown_text) and len(shown_text) < len(full.text)
    assert s.history == []
    del s.params["credit"]
    assert s.send("hello there") == full.text  # the next turn runs in full
    assert len(s.history) == 2


def test_verbose_stats_line(ctx: Context) -> None:
    out = io.StringIO()
    session(ctx, out, verbose=True).run(["hello there"])
    assert out.getvalue().splitlines()[-1].startswith("[length] 12 tokens, ")


def test_terminal_lines_from_a_pipe() -> None:
    assert list(terminal_lines(stdin=io.StringIO("one\r\ntwo\n\nthree"))) == [
        "one", "two", "", "three"]


def lorad(*args: str, stdin: str) -> subprocess.CompletedProcess:
    """The installed ``lorad`` command (``python -m`` where there is no script)."""
    script = Path(sys.executable).with_name("lorad")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lorad.client.cli"]
    return subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_lorad_chat_end_to_end(daemon: DaemonProcess, client: Client, tiny_model: Path,
                               adapter: Path) -> None:
    before = {c["id"] for c in client.list_contexts()}
    out = lorad("chat", "--endpoint", daemon.endpoint, "--model", str(tiny_model),
                "--max-tokens", "8", "--temperature", "0", "--seed", "1", "--verbose",
                "--lora", f"{adapter}:0.5", stdin="hello there\n/loras\nand then?\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    stats = [i for i, line in enumerate(lines) if line.startswith("[length] 8 tokens, ")]
    stack = lines.index(f"0\t0.5\t{adapter}")
    # reply 1, its stats, the /loras answer, reply 2, its stats
    assert len(stats) == 2 and 0 < stats[0] < stack < stack + 1 < stats[1], out.stdout
    assert out.stderr == ""
    # The temporary context is closed at the end.
    assert {c["id"] for c in client.list_contexts()} == before


def test_lorad_chat_on_an_existing_context(daemon: DaemonProcess, client: Client,
                                           tiny_model: Path, adapter: Path) -> None:
    with client.create_context(tiny_model, n_ctx=256, shared=True) as ctx:  # the CLI is
        # another client
        out = lorad("chat", "--endpoint", daemon.endpoint, "--context", ctx.id,
                    "--max-tokens", "4", "--lora", str(adapter), stdin="hi\n/bye\nnot sent\n")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
        assert [(e["ref"], e["scale"]) for e in ctx.loras()] == [(str(adapter), 1.0)]
        assert ctx.id in {c["id"] for c in client.list_contexts()}  # not closed


def test_n_ctx_without_a_temporary_context_is_refused() -> None:
    out = lorad("chat", "--context", "default", "--n-ctx", "512", stdin="")
    assert out.returncode == 2 and "--n-ctx" in out.stderr
