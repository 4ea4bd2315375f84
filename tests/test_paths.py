"""A ``~user`` the system does not know, in every argument that names a file: a typed error.

``Path.expanduser()`` raises ``RuntimeError`` for ``~nosuchuser/x``; before the fix that was an
``internal`` error with a traceback in the daemon log. Each request goes to a real daemon over
the raw protocol (the client rewrites some paths) and, for the OpenAI door, over HTTP.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq

import tinymodels
from conftest import DaemonProcess, start_daemon
from lorad.client import BadRequest, Client
from lorad.protocol import Request, decode_reply, encode_request
from lorad.protocol.refs import absolute_ref

USER = "nosuchuser"
UNKNOWN = [f"~{USER}/x", f"~{USER}", f"~{USER}/adapters/french.gguf", f"~{USER}/peft-dir/"]
"""References under the home directory of a user that does not exist."""


def test_the_user_does_not_exist() -> None:
    with pytest.raises(KeyError):
        pwd.getpwnam(USER)


class Raw:
    """Requests as any client could send them: no rewriting of paths."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 30_000)
        self.sock.connect(endpoint)
        self.n = 0

    def replies(self, op: str, args: dict[str, Any]) -> list[Any]:
        """Every reply to one request, up to its final one."""
        self.n += 1
        self.sock.send_multipart(encode_request(Request(id=self.n, op=op, args=args)))
        out = []
        while True:
            reply = decode_reply(self.sock.recv_multipart())
            if reply.id != self.n:
                continue
            out.append(reply)
            if reply.kind != "item":
                return out

    def error(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """The error a request ends with."""
        final = self.replies(op, args)[-1]
        assert final.kind == "error", (op, args, final)
        return final.error

    def result(self, op: str, args: dict[str, Any]) -> Any:
        final = self.replies(op, args)[-1]
        assert final.kind in ("result", "end"), (op, args, final)
        return final.result

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw(daemon: DaemonProcess) -> Iterator[Raw]:
    r = Raw(daemon.endpoint)
    yield r
    r.close()


@pytest.fixture
def context(raw: Raw, tiny_model: Path) -> Iterator[str]:
    ctx = raw.result("create_context", {"model": str(tiny_model), "n_ctx": 64})["id"]
    yield ctx
    raw.result("close_context", {"context": ctx})


def no_traceback(daemon: DaemonProcess) -> None:
    log = daemon.log()
    assert "Traceback" not in log and '"internal"' not in log, log[-4000:]


def draft(ref: str) -> dict[str, Any]:
    return {"mode": "draft_model", "model": ref}


@pytest.mark.parametrize("ref", UNKNOWN)
def test_models_named_by_an_unknown_users_path(raw: Raw, daemon: DaemonProcess,
                                               tiny_model: Path, ref: str) -> None:
    model = str(tiny_model)
    requests = [
        ("load_model", {"path": ref}),
        ("load_model", {"path": ref, "progress": True}),
        ("unload_model", {"model": ref}),
        ("create_context", {"model": ref}),
        ("tokenize", {"model": ref, "text": "x"}),
        ("detokenize", {"model": ref, "tokens": [1]}),
        ("embed", {"model": ref, "input": "x"}),
        ("validate_lora", {"model": ref, "path": model}),
        ("create_context", {"model": model, "n_ctx": 64, "speculative": draft(ref)}),
    ]
    for op, args in requests:
        error = raw.error(op, args)
        assert error["code"] == "bad_request", (op, args, error)
        assert f"~{USER}" in error["message"] and "no such user" in error["message"]
    no_traceback(daemon)


@pytest.mark.parametrize("ref", UNKNOWN)
def test_adapters_named_by_an_unknown_users_path(raw: Raw, daemon: DaemonProcess,
                                                 tiny_model: Path, context: str,
                                                 ref: str) -> None:
    stack = [{"path": ref, "scale": 1.0}]
    requests = [
        ("create_context", {"model": str(tiny_model), "n_ctx": 64, "loras": stack}),
        ("set_lora", {"context": context, "path": ref}),
        ("set_loras", {"context": context, "loras": stack}),
        ("validate_lora", {"model": str(tiny_model), "path": ref}),
        ("generate", {"context": context, "prompt": "x", "max_tokens": 1, "loras": stack}),
        ("chat", {"context": context, "messages": [{"role": "user", "content": "x"}],
                  "template": "chatml", "max_tokens": 1, "loras": stack}),
        ("generate", {"context": context, "prompt": "x", "max_tokens": 1,
                      "speculative": draft(ref)}),
    ]
    for op, args in requests:
        error = raw.error(op, args)
        assert error["code"] == "bad_request", (op, args, error)
    # Not in the stack, whatever it names.
    assert raw.error("remove_lora", {"context": context, "path": ref})["code"] == "not_found"
    assert raw.result("list_loras", {"context": context}) is not None
    no_traceback(daemon)


def test_the_client_sends_an_unknown_users_path_as_it_is(client: Client, tiny_model: Path,
                                                         daemon: DaemonProcess) -> None:
    """The client makes paths absolute on its side; one it cannot expand goes to the daemon
    unchanged (not as a path relative to the client's directory), which refuses it."""
    assert absolute_ref(f"~{USER}/x.gguf") == f"~{USER}/x.gguf"
    with pytest.raises(BadRequest, match="no such user"):
        client.load_model(f"~{USER}/x.gguf")
    with client.create_context(tiny_model, n_ctx=64) as ctx:
        with pytest.raises(BadRequest, match="no such user"):
            ctx.set_lora(f"~{USER}/x.gguf")
        with pytest.raises(BadRequest, match="no such user"):
            ctx.generate("x", max_tokens=1, loras=[f"~{USER}/x.gguf"]).collect()
    no_traceback(daemon)


# -- the OpenAI door --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("paths-door")
    (root / "adapters").mkdir()
    model = tinymodels.write_tiny_llama(root / "base.gguf", seed=0)
    d = start_daemon(root, [root], "--model", str(model), "--alias", "tiny", "--n-ctx", "128",
                     "--adapter-dir", str(root / "adapters"), "--http", "127.0.0.1:0")
    yield d
    assert d.stop() == 0, d.log()


def http_url(d: DaemonProcess) -> str:
    for line in d.log().splitlines():
        if '"serving"' in line:
            return json.loads(line)["http"]
    raise AssertionError(d.log())


@pytest.mark.parametrize("ref", UNKNOWN)
def test_the_http_door_refuses_an_unknown_users_path(door: DaemonProcess, ref: str) -> None:
    body = {"prompt": "x", "max_tokens": 1}
    cases = [
        ({"model": ref}, 404, "model_not_found"),
        ({"model": f"tiny:{ref}"}, 400, "bad_request"),
        ({"model": "tiny", "lora": [{"path": ref}]}, 400, "bad_request"),
    ]
    with httpx.Client(base_url=http_url(door), timeout=30) as http:
        for extra, status, code in cases:
            answer = http.post("/v1/completions", json={**body, **extra})
            assert answer.status_code == status, (extra, answer.text)
            assert answer.json()["error"]["code"] == code, (extra, answer.text)
    no_traceback(door)


def test_an_allowed_dir_of_an_unknown_user_is_a_clear_error(tmp_path: Path) -> None:
    """The operator's ``--allow-dir ~nosuchuser/models``: a message and exit status 1, no
    traceback."""
    with pytest.raises(RuntimeError, match="no such user") as info:
        start_daemon(tmp_path, [Path(f"~{USER}/models")], ready_timeout=30)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize(("where", "setting"), [
    ("config", 'allowed_dirs = ["~{user}/models"]'),
    ("config", 'adapter_dirs = ["~{user}/adapters"]'),
    ("flag", "--adapter-dir=~{user}/adapters"),
    ("flag", "--model=~{user}/m.gguf"),
])
def test_an_operators_path_of_an_unknown_user_is_a_clear_error(tmp_path: Path, where: str,
                                                               setting: str) -> None:
    """The config file's directories and the command line's paths: a message, no traceback."""
    args = []
    if where == "config":
        config = tmp_path / "lorad.toml"
        config.write_text(setting.format(user=USER) + "\n")
        args = ["--config", str(config)]
    else:
        args = [setting.format(user=USER)]
    with pytest.raises(RuntimeError, match="no such user") as info:
        start_daemon(tmp_path, [tmp_path], *args, ready_timeout=30)
    assert "Traceback" not in str(info.value)


def test_the_http_door_refuses_a_path_that_is_no_file_name(door: DaemonProcess) -> None:
    """A lone surrogate (JSON's ``\\ud800``) can be no file name: ``bad_request``, not 500."""
    cases = [{"model": "tiny", "lora": [{"path": "/x/\ud800"}]}, {"model": "tiny:\ud800"},
             {"model": "tiny", "lora": [{"name": "\ud800"}]}]
    with httpx.Client(base_url=http_url(door), timeout=30) as http:
        for extra in cases:
            answer = http.post("/v1/completions", headers={"content-type": "application/json"},
                               content=json.dumps({"prompt": "x", "max_tokens": 1, **extra}))
            assert answer.status_code == 400, (extra, answer.text)
            assert answer.json()["error"]["code"] == "bad_request", (extra, answer.text)
    no_traceback(door)


def test_the_cli_refuses_an_unknown_users_directory() -> None:
    out = subprocess.run([sys.executable, "-m", "lorad.client.cli", "default-model", "--dir",
                          f"~{USER}/models"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no such user" in out.stderr, out
    assert "Traceback" not in out.stderr
