"""What the sync and trio clients share: request ids, stream state, chunks, socket options."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from lorad.protocol import Reply, RequestId

from .errors import LoradError, error_from_wire

DEFAULT_TIMEOUT = 30.0
LOAD_TIMEOUT = 600.0
CONNECT_TIMEOUT = 2.0
HEARTBEAT_MS = 1000


def default_endpoint() -> str:
    """``$LORAD_ENDPOINT``, or the daemon's default ipc socket for this user."""
    env = os.environ.get("LORAD_ENDPOINT")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(xdg, "lorad") if xdg and os.path.isdir(xdg) else f"/tmp/lorad-{os.getuid()}"
    return f"ipc://{base}/lorad.sock"


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys of a client: the daemon's public key and the client's own key pair (Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key: str | os.PathLike, client_cert: str | os.PathLike
                   ) -> CurveKeys:
        """From the daemon's public certificate (``NAME.key``) and the client's secret one
        (``NAME.key_secret``), as ``lorad keys generate`` writes them."""
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(os.fspath(server_key))
        public, secret = zmq.auth.load_certificate(os.fspath(client_cert))
        if secret is None:
            raise ValueError(f"{client_cert} holds no secret key (use the .key_secret file)")
        return cls(server_public, public, secret)

    @classmethod
    def from_env(cls) -> CurveKeys | None:
        """``$LORAD_SERVER_KEY`` and ``$LORAD_CLIENT_CERT`` (certificate files), if both set."""
        server, client = os.environ.get("LORAD_SERVER_KEY"), os.environ.get("LORAD_CLIENT_CERT")
        return cls.from_files(server, client) if server and client else None


def configure_dealer(sock: zmq.Socket, curve: CurveKeys | None = None) -> None:
    """Socket options every client uses (see protocol/README.md, 'Liveness')."""
    if curve is not None:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.public
        sock.curve_secretkey = curve.secret
    sock.setsockopt(zmq.LINGER, 0)
    # Queue only to a live connection: a send with no daemon fails instead of waiting forever.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)


MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED


class RequestIds:
    """Client-chosen request ids: a per-client counter (unique within one connection)."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def next(self) -> int:
        return next(self._counter)


@dataclass
class Chunk:
    """One streamed piece of a generation.

    ``text`` is the new text (never a broken UTF-8 sequence), ``token_ids`` the tokens sampled for
    it, and ``logprobs`` (when asked) one entry per token: ``[(token_id, logprob), ...]`` best
    first.
    """

    text: str
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] | None = None

    @classmethod
    def from_wire(cls, item: dict[str, Any]) -> Chunk:
        lp = item.get("logprobs")
        return cls(
            text=item.get("text", ""),
            token_ids=list(item.get("token_ids", [])),
            logprobs=[[(int(t), float(p)) for t, p in entry] for entry in lp] if lp else None,
        )


@dataclass
class StreamState:
    """Sans-IO state of one stream: order checks, credit accounting, the final result."""

    request_id: RequestId
    credit: int
    finish_reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: LoradError | None = None
    consumed_since_grant: int = 0
    next_seq: int = 0
    done: bool = False
    text_parts: list[str] = field(default_factory=list)

    def apply(self, reply: Reply) -> Chunk | None:
        """Fold one reply in; returns a chunk, or None at the end (then ``done`` is set)."""
        if reply.kind == "item":
            self.next_seq += 1
            self.consumed_since_grant += 1
            chunk = Chunk.from_wire(reply.item or {})
            self.text_parts.append(chunk.text)
            return chunk
        self.done = True
        if reply.kind == "end":
            result = reply.result or {}
            self.finish_reason = result.get("finish_reason")
            self.metrics = dict(result.get("metrics") or {})
        elif reply.kind == "error":
            self.error = error_from_wire(reply.error or {})
            self.finish_reason = "error"
        return None

    def credit_to_grant(self) -> int:
        """How many items to grant now (0 while under half the window is consumed)."""
        if self.done or self.consumed_since_grant < max(1, self.credit // 2):
            return 0
        n, self.consumed_since_grant = self.consumed_since_grant, 0
        return n

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


_PENDING = object()


def load_progress_reply(reply: Reply, progress: Callable[[float], None]) -> Any:
    """Fold one reply of a ``load_model(progress=True)`` stream: report an item's progress
    and return ``PENDING``, or return the model info at the end (or raise its error)."""
    if reply.kind == "item":
        progress(float((reply.item or {}).get("progress", 0.0)))
        return _PENDING
    if reply.kind == "end":
        return (reply.result or {})["model"]
    return check_result(reply)


PENDING = _PENDING
"""What :func:`load_progress_reply` returns while the load goes on."""


def check_result(reply: Reply) -> Any:
    """The result of a one-shot reply, or raise its error."""
    if reply.kind == "error":
        raise error_from_wire(reply.error or {})
    return reply.result


def context_args(model: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Arguments of create_context: ``model`` is an id, a path, or a load_model() result."""
    if isinstance(model, dict):
        model = model["id"]
    args = {"model": os.fspath(model) if isinstance(model, os.PathLike) else model}
    args.update({k: v for k, v in params.items() if v is not None})
    if "loras" in args:
        args["loras"] = lora_stack(args["loras"])
    return args


def lora_ref(path: str | os.PathLike) -> str:
    """An adapter reference for the daemon: a name stays a name (looked up in the daemon's
    adapter directories); a path (a PathLike, or a string with ``/``, a leading ``~`` or a
    ``.gguf`` suffix) becomes absolute, since the daemon's working directory is not ours."""
    if isinstance(path, os.PathLike):
        return os.path.abspath(os.path.expanduser(os.fspath(path)))
    if "/" in path or path.startswith("~") or path.endswith(".gguf"):
        return os.path.abspath(os.path.expanduser(path))
    return path


LoraItem = Any
"""A stack entry: a path or name (scale 1.0), a ``(path, scale)`` pair, or a
``{"path": ..., "scale": ...}`` dict."""


def lora_stack(items: Iterable[LoraItem]) -> list[dict[str, Any]]:
    """The wire form of an adapter stack: ``[{"path": str, "scale": float}, ...]``."""
    out = []
    for item in items:
        if isinstance(item, dict):
            out.append({"path": lora_ref(item["path"]), "scale": item.get("scale", 1.0)})
        elif isinstance(item, (tuple, list)):
            path, scale = item
            out.append({"path": lora_ref(path), "scale": scale})
        else:
            out.append({"path": lora_ref(item), "scale": 1.0})
    return out


def parse_lora_option(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the CLI's ``--lora``): a trailing ``:number`` is the scale."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def drop_none(**kwargs: Any) -> dict[str, Any]:
    """Arguments without the ``None`` ones; a ``loras`` stack in its wire form."""
    out = {k: v for k, v in kwargs.items() if v is not None}
    if "loras" in out:
        out["loras"] = lora_stack(out["loras"])
    return out
