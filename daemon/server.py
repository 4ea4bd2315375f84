"""The daemon: one ROUTER socket, request dispatch, models, context actors, liveness, drain."""

from __future__ import annotations

import errno
import grp
import ipaddress
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from lorad.client.zmqtrio import ZmqPump
from lorad.protocol import (
    OPS,
    PROTOCOL_VERSION,
    STREAMING_OPS,
    ErrorCode,
    ProtocolError,
    Reply,
    decode_request,
    encode_reply,
    error_reply,
    validate_args,
)

from . import llama
from .actor import ContextActor, StackEntry
from .adapters import AdapterCache, LoadedAdapter
from .config import DaemonConfig
from .errors import DaemonError, to_protocol
from .logs import log
from .lora import resolve_adapter
from .metrics import Metrics
from .paths import AllowedDirs
from .peft import cached_conversion
from .registry import LoadedModel, ModelRegistry
from .requests import RequestHandle
from .sdnotify import notify, watchdog_interval
from .templates import TemplateRenderer

VERSION = "0.1.0"
DEFAULT_N_CTX = 4096
PROBE_DELAYS = (0.0, 0.05, 0.25, 1.0)
"""Seconds between the liveness probes sent after a disconnect event."""
# Operations answered inline; the rest run in their own task.
_INLINE = {"ping", "status", "capabilities", "list_models", "list_contexts", "cancel", "credit",
           "generate", "chat", "list_loras", "metrics"}
_WHILE_DRAINING = {"ping", "status", "capabilities", "list_models", "list_contexts", "cancel",
                   "credit", "close_context", "list_loras", "metrics"}


@dataclass
class Peer:
    """A connected client (a ZeroMQ routing id): its in-flight requests and owned contexts."""

    id: bytes
    requests: dict[Any, RequestHandle] = field(default_factory=dict)
    contexts: set[str] = field(default_factory=set)
    first_seen: float = field(default_factory=time.time)


class Daemon:
    """Serve lorad on ``config.endpoint`` until SIGTERM/SIGINT or :meth:`shutdown`."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.limits = config.limits
        self.allowed = AllowedDirs(config.allowed_dirs)
        self.adapter_dirs = [Path(d).expanduser().resolve() for d in config.adapter_dirs]
        self.peft_cache = Path(config.peft_cache_dir).expanduser()
        """Where PEFT adapter directories are converted to GGUF (once per content)."""
        self.allowed_adapters = AllowedDirs([*config.allowed_dirs, *config.adapter_dirs,
                                             self.peft_cache])
        self.models = ModelRegistry(self.allowed)
        self.metrics = Metrics()
        self.adapters = AdapterCache(config.limits.max_adapter_bytes, self.metrics)
        self.templates = TemplateRenderer(config.limits)
        """Worker processes that render Jinja chat templates (untrusted code)."""
        self.contexts: dict[str, ContextActor] = {}
        self.peers: dict[bytes, Peer] = {}
        self.draining = False
        self.started_at = time.time()
        self._stop = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._ipc_path: str | None = None
        self.counters = {"requests": 0, "errors": 0, "peers_lost": 0}
        self._probing = False
        self._probe_pending = False
        self._auth: Any = None  # the ZAP authenticator thread when CURVE is on

    # -- lifecycle ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Begin draining: no new requests, running streams end as cancelled, then exit."""
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        llama.init_backend()
        if self.config.metrics_address:
            from .prometheus import start_exporter

            host, port = start_exporter(self.config.metrics_address, self.metrics.snapshot)
            log.info("metrics_exporter", address=f"http://{host}:{port}/metrics")
        sock = self._bind()
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.pump = ZmqPump(sock, on_unroutable=self._on_unroutable)
        monitor_pump = ZmqPump(monitor)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.pump.run, self._on_frames)
                nursery.start_soon(monitor_pump.run, self._on_monitor)
                await nursery.start(self._watch_signals)  # handled before READY=1 is sent
                nursery.start_soon(self.templates.warm_up)
                interval = watchdog_interval()
                if interval is not None:
                    nursery.start_soon(self._watchdog, interval)
                notify("STATUS=loading models")
                await self._preload()
                notify("READY=1", f"STATUS=serving on {self.config.endpoint}")
                log.info("serving", endpoint=self.config.endpoint, pid=os.getpid(),
                         models=[m.id for m in self.models], contexts=sorted(self.contexts))
                task_status.started(self.config.endpoint)
                await self._stop.wait()
                await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.templates.aclose()
            for entry in self.models:
                entry.model.close()
            sock.disable_monitor()
            monitor_pump.close()
            self.pump.close()
            if self._auth is not None:
                self._auth.stop()
            if self._ipc_path:
                try:
                    os.unlink(self._ipc_path)
                except FileNotFoundError:
                    pass
            log.info("stopped")

    async def _watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` from the trio loop itself: a wedged loop stops the pings and systemd
        restarts the daemon (``WatchdogSec=`` in the unit)."""
        while True:
            notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("signal", signal=signal.Signals(signum).name)
                self.shutdown()

    async def _drain(self) -> None:
        self.draining = True
        notify("STOPPING=1", "STATUS=draining")
        running = sum(1 for p in self.peers.values() for _ in p.requests)
        log.info("draining", requests=running, contexts=len(self.contexts))
        for actor in list(self.contexts.values()):
            actor.cancel_all()
        with trio.move_on_after(30):
            async with trio.open_nursery() as nursery:
                for actor in list(self.contexts.values()):
                    nursery.start_soon(self._close_context, actor)
        with trio.move_on_after(5):
            await self.pump.flushed()

    async def _preload(self) -> None:
        for spec in self.config.models:
            await self.models.load(spec.path, n_gpu_layers=spec.n_gpu_layers,
                                   use_mmap=spec.use_mmap, alias=spec.alias)
        for spec in self.config.contexts:
            args = validate_args("create_context", {"model": spec.model, **spec.params,
                                                     "persistent": True})
            await self._create_context(args, owner=None, context_id=spec.id)

    # -- socket -------------------------------------------------------------------------------
    def _bind(self) -> zmq.Socket:
        endpoint = self.config.endpoint
        scheme = endpoint.split("://", 1)[0]
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes + 4096)
        sock.setsockopt(zmq.HEARTBEAT_IVL, self.config.heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * self.config.heartbeat_ms)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.LINGER, 1000)
        curve = self._setup_curve(sock)
        if scheme == "ipc":
            self._bind_ipc(sock, endpoint[len("ipc://"):])
        elif scheme == "tcp":
            host = urlsplit(endpoint).hostname or ""
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback and not curve:
                sock.close(linger=0)
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"refusing to serve on non-loopback TCP {endpoint!r} without CURVE: give "
                    "--curve-secret-key and --curve-authorized-keys (see `lorad keys "
                    "generate`), or use ipc:// or 127.0.0.1",
                    field="endpoint",
                )
            if not curve:
                log.warning("tcp_loopback", endpoint=endpoint,
                            note="any local user can connect; prefer ipc://")
            sock.bind(endpoint)
        else:
            sock.close(linger=0)
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"unsupported endpoint {endpoint!r} (use ipc:// or tcp://)",
                                field="endpoint")
        return sock

    def _setup_curve(self, sock: zmq.Socket) -> bool:
        """CURVE encryption, with ZAP refusing every client key not in the authorized
        directory (pyzmq's authenticator thread). False when not configured."""
        secret_file, authorized = self.config.curve_secret_key, self.config.curve_authorized_keys
        if not secret_file and not authorized:
            return False
        if not (secret_file and authorized):
            sock.close(linger=0)
            raise ProtocolError(ErrorCode.BAD_REQUEST, "CURVE needs both a secret key file and "
                                "a directory of authorized client keys", field="curve")
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        if not zmq.has("curve"):
            sock.close(linger=0)
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this libzmq has no CURVE support",
                                field="curve")
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            sock.close(linger=0)
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{secret_file} holds no secret key "
                                "(give the .key_secret file)", field="curve_secret_key")
        self._auth = ThreadAuthenticator(zmq.Context.instance())
        self._auth.start()
        self._auth.configure_curve(domain="lorad", location=str(authorized))
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.zap_domain = b"lorad"
        log.info("curve", authorized_keys=str(authorized),
                 server_public_key=public.decode("ascii"))
        return True

    def _bind_ipc(self, sock: zmq.Socket, path: str) -> None:
        group = self.config.group
        gid = grp.getgrnam(group).gr_gid if group else -1
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o750 if group else 0o700, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a stale socket left by a daemon that died
            else:
                sock.close(linger=0)
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    f"another lorad daemon is serving at ipc://{path}",
                                    field="endpoint")
            finally:
                probe.close()
        mode = 0o660 if group else 0o600
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(f"ipc://{path}")
        finally:
            os.umask(old)
        os.chmod(path, mode)
        if group:
            os.chown(path, -1, gid)
        self._ipc_path = path

    def send(self, peer: bytes, reply: Reply) -> None:
        try:
            frames = encode_reply(reply)
        except Exception as exc:  # a reply that cannot be encoded is a bug: never fatal
            log.exception("unencodable_reply", id=reply.id, kind=reply.kind)
            frames = encode_reply(error_reply(reply.id, ProtocolError(
                ErrorCode.INTERNAL, f"the daemon could not encode its reply: {exc}")))
        self.pump.send([peer, *frames])

    # -- liveness -----------------------------------------------------------------------------
    def _on_unroutable(self, frames: list[bytes], err: int) -> None:
        peer = frames[0]
        if peer in self.peers:
            reason = "gone" if err == errno.EHOSTUNREACH else "not reading (HWM)"
            self._peer_gone(peer, reason)

    def _peer_gone(self, peer_id: bytes, reason: str) -> None:
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return
        self.counters["peers_lost"] += 1
        for handle in list(peer.requests.values()):
            handle.cancel()
        closing = [c for c in peer.contexts if c in self.contexts
                   and not self.contexts[c].persistent]
        log.info("peer_lost", peer=peer_id.hex(), reason=reason,
                 cancelled=len(peer.requests), closing_contexts=closing)
        for ctx_id in closing:
            self._nursery.start_soon(self._close_context, self.contexts[ctx_id])

    async def _on_monitor(self, frames: list[bytes]) -> None:
        # A connection closed (or missed its heartbeats). libzmq does not say whose, so probe
        # every peer that has work or contexts: the gone ones fail with EHOSTUNREACH.
        if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED:
            self._probe_pending = True
            if not self._probing:
                self._probing = True
                self._nursery.start_soon(self._probe_peers)

    async def _probe_peers(self) -> None:
        # The monitor event can arrive before the ROUTER has dropped the peer's pipe (that
        # happens when the socket next processes its commands), and a probe sent in between is
        # silently discarded: so probe again shortly after, once per disconnect burst.
        try:
            while self._probe_pending:
                self._probe_pending = False
                for delay in PROBE_DELAYS:
                    await trio.sleep(delay)
                    for peer in list(self.peers.values()):
                        if peer.requests or peer.contexts:
                            self.send(peer.id, Reply(kind="hb"))
        finally:
            self._probing = False

    # -- dispatch -----------------------------------------------------------------------------
    async def _on_frames(self, frames: list[bytes]) -> None:
        peer_id, body = frames[0], frames[1:]
        try:
            request = decode_request(body, self.limits)
        except ProtocolError as exc:
            self.counters["errors"] += 1
            rid = exc.details.pop("id", None)
            log.info("bad_message", peer=peer_id.hex(), code=exc.code.value, error=exc.message)
            self.send(peer_id, error_reply(rid, exc))
            return
        self.counters["requests"] += 1
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = Peer(peer_id)
        try:
            if request.id in peer.requests:
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    f"request id {request.id!r} is already in flight", field="id")
            if self.draining and request.op not in _WHILE_DRAINING:
                raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            args = validate_args(request.op, request.args, self.limits)
        except ProtocolError as exc:
            self.counters["errors"] += 1
            log.info("request", id=request.id, op=request.op, peer=peer_id.hex(),
                     outcome=exc.code.value, error=exc.message)
            self.send(peer_id, error_reply(request.id, exc))
            return
        handle = RequestHandle(peer_id, request.id, request.op, args, self.send, self._done)
        peer.requests[request.id] = handle
        # A per-request adapter stack may have to load files: that runs in a task of its own.
        if request.op in _INLINE and not (request.op in STREAMING_OPS and args["loras"]):
            await self._run_op(handle)
        else:
            self._nursery.start_soon(self._run_op, handle)

    def _done(self, handle: RequestHandle) -> None:
        peer = self.peers.get(handle.peer)
        if peer is not None and peer.requests.get(handle.rid) is handle:
            del peer.requests[handle.rid]
            if not peer.requests and not peer.contexts:
                del self.peers[handle.peer]
        if handle.outcome not in ("ok", "stop", "length", "cancelled"):
            self.counters["errors"] += 1
        actor = self.contexts.get(handle.context) if isinstance(handle.context, str) else None
        self.metrics.request(model=actor.model.id if actor else None,
                             context=actor.id if actor else None,
                             outcome=handle.outcome or "ok", end_metrics=handle.end_metrics,
                             elapsed_ms=handle.elapsed_ms)

    async def _run_op(self, h: RequestHandle) -> None:
        method: Callable[[RequestHandle], Awaitable[Any]] = getattr(self, f"_op_{h.op}")
        try:
            result = await method(h)
        except (ProtocolError, DaemonError) as exc:
            h.send_error(to_protocol(exc))
        except Exception as exc:
            log.exception("internal_error", op=h.op, id=h.rid)
            h.send_error(ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        else:
            if h.op not in STREAMING_OPS:
                if h.cancelled and h.op in ("tokenize", "detokenize"):
                    h.send_error(ProtocolError(ErrorCode.CANCELLED, "cancelled"))
                else:
                    h.send_result(result)

    # -- operations ---------------------------------------------------------------------------
    async def _op_ping(self, h: RequestHandle) -> dict[str, Any]:
        return {"pong": True, "version": VERSION, "protocol": PROTOCOL_VERSION,
                "time": time.time()}

    async def _op_status(self, h: RequestHandle) -> dict[str, Any]:
        contexts = [a.info() for a in self.contexts.values() if self._visible(a, h.peer)]
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "endpoint": self.config.endpoint,
            "uptime_s": round(time.time() - self.started_at, 3),
            "draining": self.draining,
            "models": [m.info() for m in self.models],
            "contexts": contexts,
            "adapters": [a.to_wire() for a in self.adapters],
            "contexts_total": len(self.contexts),
            "queued_requests": sum(c["queued"] for c in contexts),
            "running_requests": sum(1 for c in contexts if c["running"] is not None),
            "clients": len(self.peers),
            "counters": dict(self.counters),
        }

    async def _op_capabilities(self, h: RequestHandle) -> dict[str, Any]:
        info = llama.system_info()
        return {
            "version": VERSION,
            "protocol_version": PROTOCOL_VERSION,
            "llama_cpp": info,
            "gpu_offload": info["gpu_offload"],
            "operations": sorted(OPS),
            "streaming_operations": sorted(STREAMING_OPS),
            "features": {
                "streaming": True, "cancel": True, "credit_flow_control": True,
                "logprobs": True, "grammar": True, "chat_template": True,
                "prefix_cache": True, "lora": True, "lora_stack": True, "lora_per_request": True,
                "alora": False, "speculative": True,
            },
            "busy_policy": "queue",
            "heartbeat_ms": self.config.heartbeat_ms,
            "limits": self.limits.__dict__,
            "allowed_dirs": [str(d) for d in self.allowed.dirs],
            "adapter_dirs": [str(d) for d in self.adapter_dirs],
            "speculative": {
                "modes": ["prompt_lookup", "draft_model"],
                "sampling": True,
                "per_model": {m.id: self._speculative_modes(m) for m in self.models},
            },
        }

    @staticmethod
    def _speculative_modes(entry: LoadedModel) -> dict[str, Any]:
        rollback = entry.model.can_roll_back
        why_not = None if rollback else "its memory cannot roll back rejected tokens"
        nextn = entry.model.n_nextn
        return {
            "prompt_lookup": {"available": rollback, "reason": why_not},
            "draft_model": {"available": rollback, "reason": why_not},
            "mtp": {"available": False,
                    "reason": "driving MTP heads is not implemented in lorad yet" if nextn
                    else "the model has no MTP heads"},
        }

    async def _op_metrics(self, h: RequestHandle) -> dict[str, Any]:
        visible = {a.id for a in self.contexts.values() if self._visible(a, h.peer)}
        return self.metrics.snapshot(visible)

    async def _op_list_models(self, h: RequestHandle) -> list[dict[str, Any]]:
        return [m.info() for m in self.models]

    async def _op_list_contexts(self, h: RequestHandle) -> list[dict[str, Any]]:
        return [a.info() for a in self.contexts.values() if self._visible(a, h.peer)]

    async def _op_load_model(self, h: RequestHandle) -> dict[str, Any]:
        a = h.args
        progress = None
        if a["progress"]:
            token = trio.lowlevel.current_trio_token()
            last = [-1]

            def progress(fraction: float) -> bool:  # in the loading thread
                percent = int(fraction * 100)
                if percent != last[0]:  # at most 101 items
                    last[0] = percent
                    token.run_sync_soon(h.send_progress, {"progress": round(fraction, 4)})
                return not h.cancelled  # a cancelled load stops

        started = time.perf_counter()
        entry = await self.models.load(a["path"], n_gpu_layers=a["n_gpu_layers"],
                                       use_mmap=a["use_mmap"], alias=a["alias"],
                                       progress=progress)
        info = entry.info()
        if a["progress"]:  # a stream of progress items, then the end with the model
            h.send_end({"finish_reason": "stop", "model": info,
                        "metrics": {"load_ms": round((time.perf_counter() - started) * 1000, 3),
                                    "progress_items": h.seq}})
        return info

    async def _op_unload_model(self, h: RequestHandle) -> dict[str, Any]:
        entry = self.models.get(h.args["model"])
        if entry.contexts and not h.args["force"]:
            raise ProtocolError(
                ErrorCode.IN_USE,
                f"model {entry.id!r} has {len(entry.contexts)} context(s); close them or force",
                model=entry.id, contexts=sorted(entry.contexts),
            )
        closed = sorted(entry.contexts)
        for ctx_id in closed:
            if ctx_id in self.contexts:
                await self._close_context(self.contexts[ctx_id])
        await self.adapters.drop_model(entry)
        await self.models.unload(entry)
        self.metrics.forget_model(entry.id)
        return {"model": entry.id, "unloaded": True, "closed_contexts": closed}

    async def _op_create_context(self, h: RequestHandle) -> dict[str, Any]:
        if h.args["persistent"] and not h.args["shared"]:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "a persistent context outlives its "
                                "creator's connection, so a private one would be unreachable: "
                                "pass shared=True as well", field="persistent")
        self._check_context_limits(h.peer, h.args)
        owner = None if h.args["persistent"] else h.peer
        actor = await self._create_context(h.args, owner=owner, creator=h.peer)
        if h.cancelled and not actor.persistent:  # the creator went away while we built it
            await self._close_context(actor)
        return actor.info()

    async def _model_for(self, ref: str) -> LoadedModel:
        if self.models.is_path(ref):
            return await self.models.load(ref)
        return self.models.get(ref)

    def _check_context_limits(self, peer: bytes, args: dict[str, Any]) -> None:
        limits = self.limits
        if len(self.contexts) >= limits.max_contexts:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"the daemon already has "
                                f"{len(self.contexts)} contexts (limits.max_contexts)",
                                limit="max_contexts", value=limits.max_contexts)
        mine = sum(1 for a in self.contexts.values() if a.creator == peer)
        if mine >= limits.max_contexts_per_client:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"this client already has {mine} contexts "
                                "(limits.max_contexts_per_client)",
                                limit="max_contexts_per_client",
                                value=limits.max_contexts_per_client)
        if args["n_ctx"] > limits.max_n_ctx:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"n_ctx {args['n_ctx']} is above "
                                f"limits.max_n_ctx ({limits.max_n_ctx})", field="n_ctx",
                                limit="max_n_ctx", value=limits.max_n_ctx)

    async def _create_context(self, args: dict[str, Any], *, owner: bytes | None,
                              context_id: str | None = None,
                              creator: bytes | None = None) -> ContextActor:
        entry = await self._model_for(args["model"])
        n_ctx = args["n_ctx"] or min(entry.info()["n_ctx_train"], DEFAULT_N_CTX,
                                     self.limits.max_n_ctx)
        n_threads = args["n_threads"] or os.cpu_count() or 1
        n_batch = min(args["n_batch"], n_ctx)
        ctx = await trio.to_thread.run_sync(
            lambda: llama.Context(entry.model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                  kv_type=args["kv_type"], flash_attn=args["flash_attn"])
        )
        context_id = context_id or f"ctx-{secrets.token_hex(4)}"
        params = {"n_ctx": n_ctx, "n_batch": n_batch, "n_threads": n_threads,
                  "seed": args["seed"], "kv_type": args["kv_type"],
                  "flash_attn": args["flash_attn"], "speculative": args["speculative"],
                  "shared": creator is None or args["shared"]}
        actor = ContextActor(context_id, entry, ctx, seed=args["seed"],
                             max_queued=args["max_queued"], persistent=owner is None,
                             owner=owner, params=params, adapters=self.adapters,
                             speculative=args["speculative"], templates=self.templates,
                             limits=self.limits)
        actor.creator = creator
        actor.shared = creator is None or args["shared"]
        actor.resolve_model = self._model_for
        actor.on_stack_change = lambda a: self.metrics.stack_changed(a.model.id, a.id)
        try:
            if args["speculative"]:  # a context default that cannot run fails here, not later
                await actor.prepare_speculative(args["speculative"])
            if args["loras"]:
                stack, held = await self._build_stack(entry, args["loras"], [])
                try:
                    await actor.set_stack(stack)
                finally:
                    await self._release(held)
        except BaseException:
            await actor.dispose()
            raise
        self.contexts[context_id] = actor
        entry.contexts.add(context_id)
        if owner is not None:
            peer = self.peers.get(owner)
            if peer is None:  # the peer vanished while the context was created
                self.peers[owner] = peer = Peer(owner)
            peer.contexts.add(context_id)
        self._nursery.start_soon(actor.run)
        log.info("context_created", context=context_id, model=entry.id, **params)
        return actor

    async def _close_context(self, actor: ContextActor) -> None:
        if self.contexts.get(actor.id) is not actor:
            return
        del self.contexts[actor.id]
        actor.model.contexts.discard(actor.id)
        if actor.owner is not None and actor.owner in self.peers:
            peer = self.peers[actor.owner]
            peer.contexts.discard(actor.id)
            if not peer.requests and not peer.contexts:
                del self.peers[actor.owner]
        await actor.close()
        self.metrics.forget_context(actor.id)
        log.info("context_closed", context=actor.id)

    def _visible(self, actor: ContextActor, peer: bytes) -> bool:
        """A client sees its own contexts and the shared ones (config contexts are shared)."""
        return actor.shared or actor.creator == peer

    def _context(self, context_id: str, peer: bytes) -> ContextActor:
        """The context, if ``peer`` may use it; another client's private context is
        ``not_found`` exactly like one that does not exist."""
        actor = self.contexts.get(context_id)
        if actor is None or actor.closing or not self._visible(actor, peer):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no context {context_id!r}",
                                context=context_id)
        return actor

    async def _op_close_context(self, h: RequestHandle) -> dict[str, Any]:
        actor = self._context(h.args["context"], h.peer)
        await self._close_context(actor)
        return {"context": actor.id, "closed": True}

    async def _op_generate(self, h: RequestHandle) -> None:
        actor = self._context(h.args["context"], h.peer)
        peer = self.peers.get(h.peer)
        streams = sum(1 for r in peer.requests.values() if r.op in STREAMING_OPS) if peer else 0
        if streams > self.limits.max_streams_per_client:  # this request is counted already
            raise ProtocolError(ErrorCode.TOO_LARGE, f"this client already has {streams - 1} "
                                "streams (limits.max_streams_per_client)",
                                limit="max_streams_per_client",
                                value=self.limits.max_streams_per_client)
        if h.args["loras"] is None:
            actor.submit(h, h.args)
            return
        stack, held = await self._build_stack(actor.model, h.args["loras"], actor.stack)
        try:
            actor.submit(h, h.args, stack, held)
        except BaseException:
            await self._release(held)
            raise

    _op_chat = _op_generate

    def _tokenizer(self, args: dict[str, Any], peer: bytes) -> llama.Model:
        if args["context"] is not None:
            return self._context(args["context"], peer).model.model
        return self.models.get(args["model"]).model

    async def _op_tokenize(self, h: RequestHandle) -> list[int]:
        model, a = self._tokenizer(h.args, h.peer), h.args
        return await trio.to_thread.run_sync(
            lambda: model.tokenize(a["text"], add_special=a["add_special"],
                                   parse_special=a["parse_special"])
        )

    async def _op_detokenize(self, h: RequestHandle) -> str:
        model, tokens = self._tokenizer(h.args, h.peer), h.args["tokens"]
        bad = next((t for t in tokens if t >= model.n_vocab), None)
        if bad is not None:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"token {bad} is outside the vocabulary ({model.n_vocab})",
                                field="tokens")
        return await trio.to_thread.run_sync(lambda: model.detokenize(tokens))

    # -- LoRA adapters ------------------------------------------------------------------------
    async def _release(self, held: list[LoadedAdapter]) -> None:
        with trio.CancelScope(shield=True):
            for adapter in held:
                await self.adapters.release(adapter)

    def _resolve_adapter(self, ref: str) -> Path:
        return resolve_adapter(ref, self.adapter_dirs, self.allowed_adapters)

    async def _adapter_file(self, ref: str, model: LoadedModel) -> Path:
        """The GGUF file for ``ref``: the file itself, or a PEFT directory converted for
        ``model`` (cached by content)."""
        path = await trio.to_thread.run_sync(self._resolve_adapter, ref)
        if path.is_dir():
            path = await trio.to_thread.run_sync(cached_conversion, path, model.path,
                                                 self.peft_cache)
        return path

    async def _build_stack(self, model: LoadedModel, items: list[tuple[str, float]],
                           current: list[StackEntry]) -> tuple[list[StackEntry],
                                                               list[LoadedAdapter]]:
        """Stack entries for ``items``, each adapter held once (release the second list).

        An item naming an entry of ``current`` reuses its adapter without touching the file
        system; the others are resolved, checked and loaded (or shared from the cache). On any
        error nothing stays held.
        """
        if len(items) > self.limits.max_loras:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"at most {self.limits.max_loras} adapters in a stack",
                                field="loras", limit="max_loras",
                                value=self.limits.max_loras)
        stack: list[StackEntry] = []
        held: list[LoadedAdapter] = []
        try:
            for ref, scale in items:
                same = next((e for e in current if e.matches(ref)), None)
                if same is not None:
                    adapter = same.adapter
                    adapter.refs += 1
                else:
                    path = await self._adapter_file(ref, model)
                    adapter = await self.adapters.acquire(model, path)
                held.append(adapter)
                _refuse_alora(adapter)
                if any(e.adapter.path == adapter.path for e in stack):
                    raise ProtocolError(ErrorCode.BAD_REQUEST,
                                        f"adapter {str(adapter.path)!r} is twice in the stack",
                                        field="loras", path=str(adapter.path))
                stack.append(StackEntry(ref, adapter, scale))
        except BaseException:
            await self._release(held)
            raise
        return stack, held

    async def _change_stack(self, h: RequestHandle, edit: Callable[[list[StackEntry]], Awaitable[
            tuple[list[StackEntry], list[LoadedAdapter]]]]) -> dict[str, Any]:
        actor = self._context(h.args["context"], h.peer)
        async with actor.stack_lock:
            stack, held = await edit(list(actor.stack))
            try:
                await actor.set_stack(stack)
            finally:
                await self._release(held)
        return {"context": actor.id, "loras": [e.to_wire() for e in actor.stack]}

    async def _op_set_lora(self, h: RequestHandle) -> dict[str, Any]:
        ref, scale = h.args["path"], h.args["scale"]
        model = self._context(h.args["context"], h.peer).model

        async def edit(stack: list[StackEntry]):
            i = next((i for i, e in enumerate(stack) if e.matches(ref)), None)
            if i is not None:  # a scale change: no file system access, no reload
                stack[i] = StackEntry(stack[i].ref, stack[i].adapter, scale)
                return stack, []
            [entry], held = await self._build_stack(model, [(ref, scale)], [])
            i = next((i for i, e in enumerate(stack) if e.adapter.path == entry.adapter.path),
                     None)
            if i is not None:  # the same file under another name (or a newer version of it)
                stack[i] = entry
            elif len(stack) >= self.limits.max_loras:
                await self._release(held)
                raise ProtocolError(ErrorCode.TOO_LARGE,
                                    f"at most {self.limits.max_loras} adapters in a stack",
                                    field="path", limit="max_loras",
                                    value=self.limits.max_loras)
            else:
                stack.append(entry)
            return stack, held

        return await self._change_stack(h, edit)

    async def _op_remove_lora(self, h: RequestHandle) -> dict[str, Any]:
        ref = h.args["path"]

        async def edit(stack: list[StackEntry]):
            i = next((i for i, e in enumerate(stack) if e.matches(ref)), None)
            if i is None and stack:
                try:
                    path = await trio.to_thread.run_sync(self._resolve_adapter, ref)
                except ProtocolError:
                    path = None
                i = next((i for i, e in enumerate(stack) if e.adapter.path == path), None)
            if i is None:
                raise ProtocolError(ErrorCode.NOT_FOUND,
                                    f"adapter {ref!r} is not in the stack of context "
                                    f"{h.args['context']!r}", path=ref,
                                    stack=[e.ref for e in stack])
            del stack[i]
            return stack, []

        return await self._change_stack(h, edit)

    async def _op_clear_loras(self, h: RequestHandle) -> dict[str, Any]:
        async def edit(stack: list[StackEntry]):
            return [], []

        return await self._change_stack(h, edit)

    async def _op_set_loras(self, h: RequestHandle) -> dict[str, Any]:
        model = self._context(h.args["context"], h.peer).model

        async def edit(stack: list[StackEntry]):
            return await self._build_stack(model, h.args["loras"], stack)

        return await self._change_stack(h, edit)

    async def _op_list_loras(self, h: RequestHandle) -> list[dict[str, Any]]:
        return [e.to_wire() for e in self._context(h.args["context"], h.peer).stack]

    async def _op_validate_lora(self, h: RequestHandle) -> dict[str, Any]:
        """Every check of a load, without loading: a report, not an error, for a bad adapter."""
        model = await self._model_for(h.args["model"])
        report: dict[str, Any] = {"model": model.id, "path": h.args["path"]}
        try:
            path = await self._adapter_file(h.args["path"], model)
            report["resolved"] = str(path)
            info, problems = await self.adapters.validate(model, path)
        except ProtocolError as exc:
            if exc.code not in (ErrorCode.LORA_FILE_NOT_FOUND, ErrorCode.LORA_INVALID,
                                ErrorCode.FORBIDDEN_PATH, ErrorCode.LORA_INCOMPATIBLE,
                                ErrorCode.LORA_UNSUPPORTED):
                raise
            return {**report, "compatible": False, "problems": [exc.to_wire()], "adapter": None}
        if info.is_alora:
            problems.append(_alora_error(str(path)))
        return {**report, "compatible": not problems, "problems": [p.to_wire() for p in problems],
                "adapter": info.to_wire()}

    async def _op_cancel(self, h: RequestHandle) -> dict[str, Any]:
        peer = self.peers.get(h.peer)
        target = peer.requests.get(h.args["request"]) if peer else None
        if target is None or target is h:
            return {"request": h.args["request"], "cancelled": False, "reason": "not running"}
        target.cancel()
        return {"request": h.args["request"], "cancelled": True}

    async def _op_credit(self, h: RequestHandle) -> dict[str, Any]:
        peer = self.peers.get(h.peer)
        target = peer.requests.get(h.args["request"]) if peer else None
        if target is not None and target.op in STREAMING_OPS:
            target.grant(h.args["n"])
        return {"request": h.args["request"], "granted": target is not None}


def _alora_error(path: str) -> ProtocolError:
    return ProtocolError(
        ErrorCode.LORA_UNSUPPORTED,
        f"{Path(path).name} is an activated LoRA (aLoRA): it must apply only from its invocation "
        "tokens on, which lorad does not implement yet; it is never applied as a plain LoRA",
        path=path, reason="alora_activation_not_implemented",
    )


def _refuse_alora(adapter: LoadedAdapter) -> None:
    if adapter.info.is_alora:
        raise _alora_error(str(adapter.path))


async def run_daemon(config: DaemonConfig,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    await Daemon(config).serve(task_status=task_status)
