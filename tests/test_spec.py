"""protocol/README.md against a running daemon: the spec's own tables are what is checked.

Every table the spec marks with ``<!-- spec: NAME -->`` is parsed from the markdown: key tables
(a result map's keys, one per row; ``name?`` is present only sometimes), argument tables, the
operations, the limits, the error codes and the error details (one row per case, with the exact
keys of ``details``). A real daemon on the generated tiny model is then driven over a raw
``DEALER`` socket, as a client written from the spec alone would drive it, and what it sends is
compared with those tables: no documented key missing, no undocumented key. Every reply's
envelope is checked on the way.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import tinymodels
from conftest import REPO, DaemonProcess, start_daemon
from lorad.protocol import OPS, ErrorCode, Limits

SPEC = REPO / "protocol" / "README.md"
TAG = b"lorad/1"

# -- the spec's tables ---------------------------------------------------------------------------

_MARKER = re.compile(r"^<!-- spec: (.+?) -->$")
_KEY = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`(\?)?")


@dataclass
class Table:
    name: str
    header: list[str]
    rows: list[list[str]]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def parse_spec(text: str) -> dict[str, Table]:
    """Every ``<!-- spec: NAME -->`` table of the spec, by name."""
    tables: dict[str, Table] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _MARKER.match(line.strip())
        if m is None:
            continue
        name = m.group(1)
        body = list(itertools.takewhile(lambda s: s.startswith("|"), lines[i + 1:]))
        assert len(body) >= 3, f"spec table {name!r}: no table right after its marker"
        assert name not in tables, f"spec table {name!r} is marked twice"
        tables[name] = Table(name, _cells(body[0]), [_cells(row) for row in body[2:]])
    return tables


TABLES = parse_spec(SPEC.read_text())


@dataclass(frozen=True)
class Keys:
    """Documented keys of a map: those always present, and those marked ``?``."""

    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    def matches(self, keys: set[str]) -> bool:
        return self.required <= keys <= self.required | self.optional

    def __str__(self) -> str:
        return ", ".join([*sorted(self.required), *(f"{k}?" for k in sorted(self.optional))])


def parse_keys(cell: str) -> Keys:
    """The keys named in a cell: ``\\`a\\`, \\`b\\`?`` (``—``: none)."""
    found = _KEY.findall(cell)
    return Keys(frozenset(k for k, opt in found if not opt),
                frozenset(k for k, opt in found if opt))


def key_table(name: str) -> Keys:
    """The keys of a key table: the first name in backquotes of each row's first cell."""
    required, optional = set(), set()
    for row in TABLES[name].rows:
        m = _KEY.match(row[0])
        assert m, f"spec table {name!r}: row {row[0]!r} names no key"
        (optional if m.group(2) else required).add(m.group(1))
    return Keys(frozenset(required), frozenset(optional))


def check_keys(value: Any, table: str, where: str = "") -> None:
    """``value`` is a map with exactly the keys of the spec's ``table``."""
    keys = key_table(table)
    assert isinstance(value, dict), f"{where or table}: not a map: {value!r}"
    got = set(value)
    missing, extra = keys.required - got, got - keys.required - keys.optional
    assert not missing and not extra, (
        f"{where or table}: documented keys missing {sorted(missing)}, undocumented keys "
        f"{sorted(extra)} (spec table {table!r}: {keys})")


def detail_cases(code: str) -> list[Keys]:
    return [parse_keys(row[2]) for row in TABLES["error_details"].rows if row[0] == f"`{code}`"]


def assert_error(error: dict[str, Any], code: str, keys: set[str] | None = None
                 ) -> dict[str, Any]:
    """``error`` has ``code``, and its details are exactly one documented case of that code
    (and exactly ``keys`` when given). Returns the details."""
    assert error["code"] == code, error
    got = set(error["details"])
    cases = detail_cases(code)
    assert any(c.matches(got) for c in cases), (
        f"{code} details {sorted(got)} match no case of the spec's error details: "
        f"{[str(c) for c in cases]} ({error['message']})")
    if keys is not None:
        assert got == keys, error
    return error["details"]


def parse_default(cell: str) -> Any:
    """A default as the spec writes it; ``REQUIRED`` for **required**."""
    text = cell.replace("`", "").strip()
    if text.startswith("**required**"):
        return REQUIRED
    literals = {"nil": None, "true": True, "false": False, "[]": []}
    if text in literals:
        return literals[text]
    if text.startswith('"'):
        return json.loads(text)
    return float(text) if "." in text else int(text)


REQUIRED = object()


def documented_args() -> dict[str, dict[str, Any]]:
    """op -> {argument: default} from the spec's argument tables."""
    out: dict[str, dict[str, Any]] = {op: {} for op in OPS}
    for name, table in TABLES.items():
        if not name.startswith("args ") or name == "args sampling":
            continue
        ops = name.split()[1:]
        with_op = table.header[0] == "Operation"
        for row in table.rows:
            cells = row[1:] if with_op else row
            targets = ops
            if with_op and row[0] not in ("both", "all"):
                named = [k for k, _ in _KEY.findall(row[0])]
                targets = [o for o in ops if o not in named] if row[0].startswith("all but") \
                    else named
            if "sampling arguments" in cells[0]:
                args = {r[0].strip("`"): parse_default(r[2]) for r in TABLES["args sampling"].rows}
            else:
                args = {cells[0].strip("`"): parse_default(cells[2])}
            for op in targets:
                out[op].update(args)
    return out


# -- a client written from the spec --------------------------------------------------------------


def check_reply(body: Any) -> None:
    """A reply body has exactly the keys its kind has in the spec (and an error map its own)."""
    assert isinstance(body, dict), body
    kinds = {row[0].strip("`"): parse_keys(row[1]) for row in TABLES["reply"].rows}
    kind = body.get("kind")
    assert kind in kinds, body
    assert kinds[kind].matches(set(body)), f"{kind} reply keys {sorted(body)}: spec {kinds[kind]}"
    assert body["v"] == 1
    if kind == "error":
        check_keys(body["error"], "error")
        assert isinstance(body["error"]["details"], dict)


class Peer:
    """One connection: a DEALER with the spec's socket options, replies routed by id."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)  # with IMMEDIATE: fail, never block forever
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)
        self.inbox: dict[Any, collections.deque[dict[str, Any]]] = collections.defaultdict(
            collections.deque)
        self.unrouted: collections.deque[dict[str, Any]] = collections.deque()

    def close(self) -> None:
        self.sock.close(0)

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def send(self, op: str, args: dict[str, Any] | None = None, rid: Any = None) -> Any:
        rid = next(self.ids) if rid is None else rid
        body = {"v": 1, "id": rid, "op": op, "args": args or {}}
        self.send_frames([TAG, msgpack.packb(body, use_bin_type=True)])
        return rid

    def _read(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        assert remaining > 0 and self.sock.poll(int(remaining * 1000) + 1), "no reply in time"
        frames = self.sock.recv_multipart()
        assert len(frames) == 2 and frames[0] == TAG, frames
        body = msgpack.unpackb(frames[1], raw=False)
        check_reply(body)
        if "id" in body:
            self.inbox[body["id"]].append(body)
        else:
            self.unrouted.append(body)

    def reply(self, rid: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.inbox[rid]:
            self._read(deadline)
        return self.inbox[rid].popleft()

    def unrouted_reply(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        """The next reply without an id of that kind (others without an id are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.unrouted:
                body = self.unrouted.popleft()
                if body["kind"] == kind:
                    return body
            self._read(deadline)

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        body = self.reply(self.send(op, args))
        assert body["kind"] == "result", body
        return body["result"]

    def error(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self.reply(self.send(op, args))
        assert body["kind"] == "error", body
        return body["error"]

    def stream(self, rid: Any, consumed: int = 0, timeout: float = 60
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The (further) items of a stream, and its final reply (``end`` or ``error``);
        ``consumed``: the items already read."""
        items: list[dict[str, Any]] = []
        while True:
            body = self.reply(rid, timeout)
            if body["kind"] != "item":
                if body["kind"] == "end":
                    assert body["seq"] == consumed + len(items)
                return items, body
            assert body["seq"] == consumed + len(items)
            items.append(body["item"])

    @contextmanager
    def context(self, **args: Any) -> Iterator[dict[str, Any]]:
        """A context, closed again at the end (limits count contexts until they are closed)."""
        info = self.call("create_context", {"n_ctx": 128, **args})
        try:
            yield info
        finally:
            self.call("close_context", {"context": info["id"]})


# -- the daemon and its files --------------------------------------------------------------------

LIMITS = {"max_message_bytes": 1 << 20, "max_str_len": 65536, "max_contexts": 4,
          "max_contexts_per_client": 3, "max_streams_per_client": 2, "max_loras": 2,
          "max_n_ctx": 1024, "max_adapter_bytes": 8192}
"""Small limits for this module's daemon, so that each can be reached cheaply."""

BOS, EOS, UNK = 1, 2, 0
BYTE0 = 3  # tinymodels.default_vocab(): <unk> <s> </s>, then the 256 byte tokens


@dataclass
class Files:
    dir: Path
    small: Path
    small2: Path
    big: Path
    garbage: Path
    model_as_adapter: Path
    missing_b: Path
    rank_mismatch: Path
    bad_shape: Path
    unknown_tensor: Path
    wrong_arch: Path
    alora: Path
    alora2: Path
    alora_bad: Path
    dora: Path
    broken_model: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("spec-adapters")
    base = tinymodels.tiny_llama_tensors(seed=0)
    dora = d / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "use_dora": True, "r": 1, "lora_alpha": 1,
         "target_modules": ["q_proj"]}))
    return Files(
        dir=d,
        small=tinymodels.write_lora(d / "small.gguf", base, targets=("attn_q",), rank=1).path,
        small2=tinymodels.write_lora(d / "small2.gguf", base, targets=("attn_q",), rank=1,
                                     seed=2).path,
        big=tinymodels.write_lora(d / "big.gguf", base, targets=("attn_q",), rank=32).path,
        garbage=tinymodels.write_garbage(d / "garbage.gguf"),
        model_as_adapter=tinymodels.write_not_lora_gguf(d / "model.gguf"),
        missing_b=tinymodels.write_lora_missing_b(d / "missing_b.gguf", base),
        rank_mismatch=tinymodels.write_lora_rank_mismatch(d / "rank_mismatch.gguf", base),
        bad_shape=tinymodels.write_lora_bad_shape(d / "bad_shape.gguf", base),
        unknown_tensor=tinymodels.write_lora_unknown_tensor(d / "unknown_tensor.gguf", base),
        wrong_arch=tinymodels.write_lora_wrong_arch(d / "wrong_arch.gguf", base),
        alora=tinymodels.write_alora(d / "alora.gguf", base),
        alora2=tinymodels.write_alora(d / "alora2.gguf", base, invocation_tokens=(8, 9)),
        alora_bad=tinymodels.write_alora_bad_token_type(d / "alora_bad.gguf", base),
        dora=dora,
        broken_model=tinymodels.write_garbage(d / "broken-model.gguf", seed=1),
    )


@pytest.fixture(scope="module")
def spec_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_model: Path,
                tiny_model_b: Path, files: Files) -> Iterator[DaemonProcess]:
    workdir = tmp_path_factory.mktemp("spec-daemon")
    config = workdir / "lorad.toml"
    lines = [f"allowed_dirs = {json.dumps([str(models_dir), str(files.dir)])}",
             f"adapter_dirs = {json.dumps([str(files.dir)])}",
             f"peft_cache_dir = {json.dumps(str(workdir / 'peft'))}", "[limits]",
             *(f"{k} = {v}" for k, v in LIMITS.items())]
    config.write_text("\n".join(lines) + "\n")
    d = start_daemon(workdir, [], "--config", str(config))
    yield d
    code = d.stop()
    assert code == 0, d.log()
    assert '"level": "error"' not in d.log(), d.log()


@pytest.fixture
def peer(spec_daemon: DaemonProcess) -> Iterator[Peer]:
    p = Peer(spec_daemon.endpoint)
    yield p
    p.close()


@pytest.fixture
def model(peer: Peer, tiny_model: Path) -> dict[str, Any]:
    return peer.call("load_model", {"path": str(tiny_model)})


def wait_first_item(peer: Peer, rid: Any) -> dict[str, Any]:
    body = peer.reply(rid)
    assert body["kind"] == "item", body  # the stream runs, and waits for credit after this
    return body["item"]


def holding_stream(peer: Peer, context: str) -> Any:
    """A running stream that keeps ``context`` busy: credit 1, so it waits after one item."""
    rid = peer.send("generate", {"context": context, "prompt": "hello world", "temperature": 0,
                                 "max_tokens": 100, "credit": 1})
    wait_first_item(peer, rid)
    return rid


def cancel(peer: Peer, rid: Any, consumed: int = 1) -> dict[str, Any]:
    """Cancel a stream of which ``consumed`` items were read; its ``end``."""
    result = peer.call("cancel", {"request": rid})
    check_keys(result, "cancel")
    _, end = peer.stream(rid, consumed)
    assert end["kind"] == "end" and end["result"]["finish_reason"] == "cancelled", end
    return end


# -- the tables themselves -----------------------------------------------------------------------


def test_every_table_is_there() -> None:
    expected = {"reply", "error", "operations", "ping", "status", "status.counters",
                "adapter_record", "slab_record", "capabilities", "capabilities.llama_cpp",
                "capabilities.batching", "capabilities.gpu",
                "capabilities.features", "capabilities.speculative", "speculative_availability",
                "model", "model.params", "context", "context.params", "metrics", "metrics.stats",
                "metrics.latency", "load_model.item", "load_model.end", "load_model.end.metrics",
                "unload_model", "close_context", "cancel", "credit", "stack_result",
                "stack_entry", "validate_lora", "name_lora", "unname_lora", "speculative_modes",
                "item", "end",
                "end.metrics", "end.metrics.loras", "end.metrics.queued", "limits",
                "error_codes", "error_details", "args sampling"}
    assert expected <= set(TABLES), sorted(expected - set(TABLES))
    for name in expected - {"reply", "operations", "limits", "error_codes", "error_details",
                            "speculative_modes", "args sampling"}:
        assert key_table(name).required | key_table(name).optional


def test_error_codes_are_the_protocol_codes() -> None:
    codes = {row[0].strip("`") for row in TABLES["error_codes"].rows}
    assert codes == {c.value for c in ErrorCode}
    detailed = {row[0].strip("`") for row in TABLES["error_details"].rows}
    assert detailed == codes  # every code has its cases


def test_argument_defaults_are_the_daemons() -> None:
    """The argument tables list exactly the arguments each operation validates, with their
    defaults (the daemon validates with ``lorad.protocol.OPS``)."""
    documented = documented_args()
    for op, schema in OPS.items():
        assert set(documented[op]) == set(schema), (op, sorted(documented[op]), sorted(schema))
        for name, spec in schema.items():
            default = documented[op][name]
            if spec.required:
                assert default is REQUIRED, (op, name)
            else:
                assert default is not REQUIRED and default == spec.default, (op, name, default)


def test_limit_defaults_are_the_daemons() -> None:
    defaults = {row[0].strip("`"): int(re.match(r"\d+", row[1]).group())
                for row in TABLES["limits"].rows}
    assert defaults == asdict(Limits())


# -- what the daemon sends -----------------------------------------------------------------------


def test_operations(peer: Peer) -> None:
    caps = peer.call("capabilities")
    rows = TABLES["operations"].rows
    assert caps["operations"] == sorted(row[0].strip("`") for row in rows)
    assert caps["streaming_operations"] == sorted(row[0].strip("`") for row in rows
                                                  if "**stream**" in row[1])


def test_every_operation_accepts_the_documented_arguments(peer: Peer) -> None:
    documented = documented_args()
    for op in OPS:
        err = peer.error(op, {"zz_not_an_argument": 1})
        details = assert_error(err, "bad_request", {"field", "accepted"})
        assert details["field"] == "zz_not_an_argument"
        assert details["accepted"] == sorted(documented[op]), op


def test_ping(peer: Peer) -> None:
    check_keys(peer.call("ping"), "ping")


def test_capabilities(peer: Peer, model: dict[str, Any]) -> None:
    caps = peer.call("capabilities")
    check_keys(caps, "capabilities")
    check_keys(caps["llama_cpp"], "capabilities.llama_cpp")
    check_keys(caps["features"], "capabilities.features")
    for row in TABLES["capabilities.features"].rows:  # the values too: true or false
        assert caps["features"][row[0].strip("`")] == (row[1].split(":")[0] == "true"), row
    check_keys(caps["speculative"], "capabilities.speculative")
    check_keys(caps["batching"], "capabilities.batching")
    check_keys(caps["gpu"], "capabilities.gpu")
    modes = {row[0].strip("`") for row in TABLES["speculative_modes"].rows}
    assert set(caps["speculative"]["modes"]) <= modes
    assert model["id"] in caps["speculative"]["per_model"]
    for model_id, per_mode in caps["speculative"]["per_model"].items():
        assert set(per_mode) == modes, model_id
        for mode, availability in per_mode.items():
            check_keys(availability, "speculative_availability", f"per_model.{model_id}.{mode}")
    limits = {row[0].strip("`") for row in TABLES["limits"].rows}
    assert set(caps["limits"]) == limits, (sorted(set(caps["limits"]) - limits),
                                           sorted(limits - set(caps["limits"])))
    assert caps["limits"] == {**asdict(Limits()), **LIMITS}


def test_status_and_infos(peer: Peer, spec_daemon: DaemonProcess, model: dict[str, Any],
                          files: Files) -> None:
    check_keys(model, "model")
    check_keys(model["params"], "model.params")
    with peer.context(model=model["id"], loras=[str(files.small)]) as ctx:
        check_keys(ctx, "context")
        check_keys(ctx["params"], "context.params")
        assert len(ctx["loras"]) == 1
        for entry in ctx["loras"]:
            check_keys(entry, "stack_entry")
        status = peer.call("status")
        check_keys(status, "status")
        check_keys(status["counters"], "status.counters")
        assert status["adapters"], "an adapter is loaded"
        for record in status["adapters"]:
            check_keys(record, "adapter_record")
        assert status["batching"], "the context is a sequence of a batched llama context"
        for record in status["batching"]:
            check_keys(record, "slab_record")
        for info in status["models"]:
            check_keys(info, "model")
        assert ctx["id"] in [c["id"] for c in status["contexts"]]
        for info in [*status["contexts"], *peer.call("list_contexts")]:
            check_keys(info, "context")
            check_keys(info["params"], "context.params")
        for info in peer.call("list_models"):
            check_keys(info, "model")
        # contexts_total counts the private contexts of other connections too
        other = Peer(spec_daemon.endpoint)
        try:
            theirs = other.call("status")
            assert ctx["id"] not in [c["id"] for c in theirs["contexts"]]
            assert theirs["contexts_total"] == len(theirs["contexts"]) + 1
        finally:
            other.close()


def test_speculative_defaults_in_context_params(peer: Peer, model: dict[str, Any],
                                                tiny_model_b: Path) -> None:
    """A context's ``params.speculative`` has the mode's parameters with the spec's defaults."""
    documented = {}
    for row in TABLES["speculative_modes"].rows:
        params = re.findall(r"`(\w+)` \(([^,)]+)", row[1])
        documented[row[0].strip("`")] = dict(params)
    spec = {"prompt_lookup": {}, "draft_model": {"model": str(tiny_model_b)}}
    for mode, given in spec.items():
        with peer.context(model=model["id"], speculative={"mode": mode, **given}) as ctx:
            got = ctx["params"]["speculative"]
            assert got["mode"] == mode
            expected = {k: given[k] if v.startswith("**required**") else parse_default(v)
                        for k, v in documented[mode].items()}
            assert {k: v for k, v in got.items() if k != "mode"} == expected, mode


def test_stack_results(peer: Peer, model: dict[str, Any], files: Files) -> None:
    with peer.context(model=model["id"]) as ctx:
        for op, args in [("set_lora", {"path": str(files.small), "scale": 0.5}),
                         ("set_loras", {"loras": [str(files.small), [str(files.small2), 2]]}),
                         ("remove_lora", {"path": str(files.small2)}),
                         ("clear_loras", {})]:
            result = peer.call(op, {"context": ctx["id"], **args})
            check_keys(result, "stack_result", op)
            for entry in result["loras"]:
                check_keys(entry, "stack_entry", op)
        peer.call("set_lora", {"context": ctx["id"], "path": "small"})  # a name
        for entry in peer.call("list_loras", {"context": ctx["id"]}):
            check_keys(entry, "stack_entry", "list_loras")


def test_adapter_names(peer: Peer, model: dict[str, Any], files: Files) -> None:
    named = peer.call("name_lora", {"name": "spec-small", "path": str(files.small)})
    check_keys(named, "name_lora")
    assert model["id"] in named["models"]
    assert {"name": "spec-small", "path": named["path"]} in peer.call("list_lora_names")
    with peer.context(model=model["id"]) as ctx:  # a name given at run time works as any name
        result = peer.call("set_lora", {"context": ctx["id"], "path": "spec-small"})
        assert result["loras"][0]["path"] == named["path"]
    taken = peer.error("name_lora", {"name": "spec-small", "path": str(files.small2)})
    assert assert_error(taken, "bad_request")["field"] == "name"
    assert_error(peer.error("name_lora", {"name": "x", "path": str(files.wrong_arch)}),
                 "lora_incompatible", {"field", "models"})
    check_keys(peer.call("unname_lora", {"name": "spec-small"}), "unname_lora")
    assert_error(peer.error("unname_lora", {"name": "spec-small"}), "not_found",
                 {"field", "registered"})


def test_validate_lora(peer: Peer, model: dict[str, Any], files: Files) -> None:
    entry = key_table("stack_entry")
    for path in (files.small, files.wrong_arch, files.bad_shape):
        report = peer.call("validate_lora", {"model": model["id"], "path": str(path)})
        check_keys(report, "validate_lora")
        assert "resolved" in report
        assert set(report["adapter"]) == entry.required - {"ref", "scale"}
        for problem in report["problems"]:
            check_keys(problem, "error")
            assert_error(problem, "lora_incompatible")
    report = peer.call("validate_lora", {"model": model["id"], "path": "no-such-adapter"})
    check_keys(report, "validate_lora")
    assert "resolved" not in report and report["adapter"] is None
    assert_error(report["problems"][0], "lora_file_not_found")


def test_generation_metrics(peer: Peer, model: dict[str, Any], files: Files,
                            tiny_model_b: Path) -> None:
    with peer.context(model=model["id"]) as ctx:
        for extra in ({"logprobs": 2, "loras": [str(files.small)]},
                      {"speculative": {"mode": "prompt_lookup"}},
                      {"speculative": {"mode": "draft_model", "model": str(tiny_model_b)}}):
            rid = peer.send("generate", {"context": ctx["id"], "prompt": "hello world",
                                         "max_tokens": 6, "temperature": 0, **extra})
            items, end = peer.stream(rid)
            assert end["kind"] == "end", end
            for item in items:
                check_keys(item, "item")
                if extra.get("logprobs") and item["token_ids"]:
                    assert len(item["logprobs"]) == len(item["token_ids"])
            check_keys(end["result"], "end")
            metrics = end["result"]["metrics"]
            check_keys(metrics, "end.metrics")
            for entry in metrics["loras"]:
                check_keys(entry, "end.metrics.loras")
            assert len(metrics["loras"]) == len(extra.get("loras", []))
            assert metrics["speculative"] is ("speculative" in extra)
            # generated_tokens: the tokens sent, plus the end-of-generation token
            sent = sum(len(item["token_ids"]) for item in items)
            reason = end["result"]["finish_reason"]
            assert metrics["generated_tokens"] == sent + (reason == "stop"), (reason, metrics)

        stats = peer.call("metrics")
        check_keys(stats, "metrics")
        assert model["id"] in stats["models"] and ctx["id"] in stats["contexts"]
        for where, s in [("total", stats["total"]), *stats["models"].items(),
                         *stats["contexts"].items()]:
            check_keys(s, "metrics.stats", where)
            check_keys(s["time_to_first_token_ms"], "metrics.latency", where)
            check_keys(s["request_ms"], "metrics.latency", where)


def test_cancelled_streams(peer: Peer, model: dict[str, Any]) -> None:
    """A cancelled stream counts at most one token it never sent; one cancelled while queued
    has ``generated_tokens`` only."""
    with peer.context(model=model["id"], max_queued=1) as ctx:
        running = peer.send("generate", {"context": ctx["id"], "prompt": "hello world",
                                         "temperature": 0, "max_tokens": 100, "credit": 1})
        first = wait_first_item(peer, running)
        queued = peer.send("generate", {"context": ctx["id"], "prompt": "hello"})
        assert peer.call("cancel", {"request": queued}) == {"request": queued,
                                                            "cancelled": True}
        end = cancel(peer, running)
        metrics = end["result"]["metrics"]
        check_keys(metrics, "end.metrics")
        assert metrics["generated_tokens"] - len(first["token_ids"]) in (0, 1)
        items, end = peer.stream(queued)
        assert items == [] and end["kind"] == "end", end
        assert end["result"]["finish_reason"] == "cancelled"
        check_keys(end["result"]["metrics"], "end.metrics.queued")
    result = peer.call("cancel", {"request": running})  # finished: not running
    check_keys(result, "cancel")
    assert result == {"request": running, "cancelled": False, "reason": "not running"}
    check_keys(peer.call("credit", {"request": running, "n": 1}), "credit")


def test_load_unload_close_results(peer: Peer, tiny_model_b: Path) -> None:
    rid = peer.send("load_model", {"path": str(tiny_model_b), "use_mmap": False,
                                   "progress": True})
    items, end = peer.stream(rid)
    assert end["kind"] == "end", end
    for item in items:
        check_keys(item, "load_model.item")
    check_keys(end["result"], "load_model.end")
    check_keys(end["result"]["model"], "model")
    check_keys(end["result"]["metrics"], "load_model.end.metrics")
    assert end["result"]["metrics"]["progress_items"] == end["seq"] == len(items)
    model_id = end["result"]["model"]["id"]
    closed = peer.call("create_context", {"model": model_id, "n_ctx": 64})
    check_keys(peer.call("close_context", {"context": closed["id"]}), "close_context")
    kept = peer.call("create_context", {"model": model_id, "n_ctx": 64})
    assert_error(peer.error("unload_model", {"model": model_id}), "in_use",
                 {"model", "contexts", "creating"})
    result = peer.call("unload_model", {"model": model_id, "force": True})
    check_keys(result, "unload_model")
    assert result["closed_contexts"] == [kept["id"]]


def test_hb(spec_daemon: DaemonProcess, peer: Peer, model: dict[str, Any]) -> None:
    """A peer with a context gets an ``hb`` (no id) when another connection goes away."""
    with peer.context(model=model["id"]):
        other = Peer(spec_daemon.endpoint)
        other.call("ping")
        other.close()
        assert peer.unrouted_reply("hb", timeout=10) == {"v": 1, "kind": "hb"}


def test_detokenize_renders_special_tokens_as_nothing(peer: Peer, model: dict[str, Any]) -> None:
    """What §5.9 says about ``detokenize``, on the tiny SentencePiece-style vocabulary."""
    m = model["id"]
    tokens = peer.call("tokenize", {"model": m, "text": "hello"})
    assert tokens[0] == BOS
    assert peer.call("detokenize", {"model": m, "tokens": tokens}) == " hello"
    assert peer.call("detokenize", {"model": m, "tokens": [BOS, UNK, EOS]}) == ""
    special = peer.call("tokenize", {"model": m, "text": "<s>hi", "add_special": False,
                                     "parse_special": True})
    assert BOS in special
    assert "<s>" not in peer.call("detokenize", {"model": m, "tokens": special})
    e_acute = [BYTE0 + b for b in "é".encode()]
    assert peer.call("detokenize", {"model": m, "tokens": e_acute}) == "é"
    assert peer.call("detokenize", {"model": m, "tokens": e_acute[:1]}) == "\ufffd"


# -- error details -------------------------------------------------------------------------------


def test_envelope_errors(peer: Peer) -> None:
    def unrouted_error(frames: list[bytes]) -> dict[str, Any]:
        peer.send_frames(frames)
        return peer.unrouted_reply("error")["error"]

    ping = msgpack.packb({"v": 1, "id": 1, "op": "ping", "args": {}})
    assert_error(unrouted_error([TAG, ping, b""]), "bad_request", set())
    assert_error(unrouted_error([b"lorad/2", ping]), "unsupported_version", {"supported"})
    assert_error(unrouted_error([b"hello", ping]), "bad_request", set())
    assert_error(unrouted_error([TAG, msgpack.packb([1, 2])]), "bad_request", set())
    assert_error(unrouted_error([TAG, msgpack.packb({"v": 1, "id": 1.5, "op": "ping"})]),
                 "bad_request", {"field"})
    peer.send_frames([TAG, msgpack.packb({"v": 2, "id": "v2", "op": "ping"})])
    assert_error(peer.reply("v2")["error"], "unsupported_version", {"supported"})
    peer.send_frames([TAG, msgpack.packb({"v": 1, "id": "x", "op": "ping", "extra": 1})])
    assert assert_error(peer.reply("x")["error"], "bad_request", {"field"}) == {
        "field": "message"}
    details = assert_error(peer.error("no_such_op"), "bad_request", {"field", "known"})
    assert details["known"] == sorted(OPS)


def test_too_large(peer: Peer, model: dict[str, Any], files: Files,
                   spec_daemon: DaemonProcess) -> None:
    nested: list[Any] = []
    for _ in range(40):
        nested = [nested]
    peer.send("generate", {"context": "c", "prompt": nested})
    assert_error(peer.unrouted_reply("error")["error"], "too_large", {"limit"})
    peer.send("generate", {"context": "c", "prompt": "x" * (LIMITS["max_str_len"] + 1)})
    assert_error(peer.unrouted_reply("error")["error"], "too_large", set())
    # just above max_message_bytes (far above, libzmq would drop the connection instead)
    pad = LIMITS["max_message_bytes"]
    body = msgpack.packb({"v": 1, "id": 1, "op": "ping", "args": {"x": b"\0" * pad}},
                         use_bin_type=True)
    peer.send_frames([TAG, body])
    assert_error(peer.unrouted_reply("error")["error"], "too_large", {"limit"})

    err = peer.error("create_context", {"model": model["id"], "n_ctx": LIMITS["max_n_ctx"] + 1})
    assert assert_error(err, "too_large", {"field", "limit", "value"})["limit"] == "max_n_ctx"
    err = peer.error("set_loras", {"context": "c", "loras": ["a", "b", "c"]})
    assert assert_error(err, "too_large", {"field", "limit", "value"})["limit"] == "max_loras"

    other = Peer(spec_daemon.endpoint)
    mine, theirs = [], []
    try:
        for _ in range(LIMITS["max_contexts_per_client"]):
            mine.append(peer.call("create_context", {"model": model["id"], "n_ctx": 64}))
        err = peer.error("create_context", {"model": model["id"], "n_ctx": 64})
        details = assert_error(err, "too_large", {"limit", "value"})
        assert details["limit"] == "max_contexts_per_client"
        theirs.append(other.call("create_context", {"model": model["id"], "n_ctx": 64}))
        err = other.error("create_context", {"model": model["id"], "n_ctx": 64})
        assert assert_error(err, "too_large", {"limit", "value"})["limit"] == "max_contexts"
        # streams: one running, one queued, the next is one too many
        ctx = mine[0]["id"]
        running = holding_stream(peer, ctx)
        queued = peer.send("generate", {"context": ctx, "prompt": "hello", "max_tokens": 1})
        rid = peer.send("generate", {"context": ctx, "prompt": "hello", "max_tokens": 1})
        err = peer.reply(rid)["error"]
        assert assert_error(err, "too_large", {"limit", "value"})["limit"] == \
            "max_streams_per_client"
        cancel(peer, running)
        peer.stream(queued)
        # adapter memory
        err = peer.error("set_lora", {"context": ctx, "path": str(files.big)})
        details = assert_error(err, "too_large", {"path", "limit", "value"})
        assert details["limit"] == "max_adapter_bytes"
    finally:
        for info in theirs:
            other.call("close_context", {"context": info["id"]})
        for info in mine:
            peer.call("close_context", {"context": info["id"]})
        other.close()


def test_request_errors(peer: Peer, model: dict[str, Any], files: Files, tiny_model: Path,
                        spec_daemon: DaemonProcess) -> None:
    m = model["id"]
    err = peer.error("generate", {"context": "c", "prompt": "x", "max_tokens": 0})
    assert assert_error(err, "bad_request", {"field"}) == {"field": "max_tokens"}
    assert_error(peer.error("close_context", {"context": "ctx-00000000"}), "not_found",
                 {"context"})
    assert_error(peer.error("unload_model", {"model": "no-such-model"}), "not_found",
                 {"model", "loaded"})
    assert_error(peer.error("load_model", {"path": str(tiny_model.parent / "no-such.gguf")}),
                 "not_found", {"path", "resolved"})
    outside = spec_daemon.workdir / "outside.gguf"
    outside.write_bytes(tiny_model.read_bytes())
    assert_error(peer.error("load_model", {"path": str(outside)}), "forbidden_path",
                 {"path", "resolved", "allowed"})
    assert_error(peer.error("load_model", {"path": str(files.broken_model)}),
                 "model_load_failed", {"path", "log"})
    assert_error(peer.error("tokenize", {"text": "x"}), "bad_request", {"field"})
    assert_error(peer.error("detokenize", {"model": m, "tokens": [10**6]}), "bad_request",
                 {"field"})

    with peer.context(model=m, max_queued=0) as ctx:
        c = ctx["id"]
        running = holding_stream(peer, c)
        err = peer.error("generate", {"context": c, "prompt": "hello"})
        assert_error(err, "context_busy", {"context", "queued", "max_queued"})
        peer.send("ping", rid=running)  # an id still in flight
        err = peer.reply(running)["error"]
        assert assert_error(err, "bad_request", {"field"}) == {"field": "id"}
        cancel(peer, running)

        prompt = "the " * (ctx["n_ctx"] + 8)
        _, end = peer.stream(peer.send("generate", {"context": c, "prompt": prompt}))
        assert_error(end["error"], "context_overflow", {"prompt_tokens", "n_ctx"})
        _, end = peer.stream(peer.send("chat", {
            "context": c, "messages": [{"role": "user", "content": "hi"}],
            "template": "no-such-template"}))
        assert_error(end["error"], "bad_request", {"field", "builtin"})
        _, end = peer.stream(peer.send("generate", {"context": c, "prompt": "hello",
                                                    "grammar": "root ::= undefined-rule"}))
        assert_error(end["error"], "bad_request", {"field", "log"})
        deep = "root ::= " + "(" * 100 + '"a"' + ")" * 100
        _, end = peer.stream(peer.send("generate", {"context": c, "prompt": "hello",
                                                    "grammar": deep}))
        assert_error(end["error"], "bad_request", {"field", "limit", "value", "found"})
        assert_error(peer.error("remove_lora", {"context": c, "path": str(files.small)}),
                     "not_found", {"path", "stack"})
        assert_error(peer.error("unload_model", {"model": m}), "in_use",
                     {"model", "contexts", "creating"})


def test_lora_errors(peer: Peer, model: dict[str, Any], files: Files) -> None:
    with peer.context(model=model["id"]) as ctx:
        c = ctx["id"]

        def set_lora(path: Path | str, **args: Any) -> dict[str, Any]:
            return peer.error("set_lora", {"context": c, "path": str(path), **args})

        assert_error(set_lora("no-such-name"), "lora_file_not_found",
                     {"path", "searched", "adapter_dirs"})
        assert_error(set_lora(files.dir / "no-such.gguf"), "lora_file_not_found",
                     {"path", "searched"})
        assert_error(set_lora(files.garbage), "lora_invalid", {"path", "magic"})
        assert_error(set_lora(files.model_as_adapter), "lora_invalid", {"path", "general_type"})
        assert_error(set_lora(files.missing_b), "lora_invalid", {"path", "tensor", "missing"})
        assert_error(set_lora(files.rank_mismatch), "lora_invalid",
                     {"path", "tensor", "lora_a", "lora_b"})
        for path, keys in [
            (files.wrong_arch, {"path", "adapter_architecture", "model_architecture"}),
            (files.unknown_tensor, {"path", "tensor"}),
            (files.bad_shape, {"path", "tensor", "model_shape", "expected_lora_a",
                               "expected_lora_b", "found_lora_a", "found_lora_b"}),
        ]:
            details = assert_error(set_lora(path), "lora_incompatible", {*keys, "problems"})
            for problem in details["problems"]:
                check_keys(problem, "error")
                assert_error(problem, "lora_incompatible")
        assert_error(set_lora(files.alora_bad), "lora_load_failed", {"path", "log"})
        assert peer.call("set_lora", {"context": c, "path": str(files.alora)})["loras"]
        assert_error(set_lora(files.alora2), "lora_unsupported", {"path", "reason"})
        assert peer.call("clear_loras", {"context": c})["loras"] == []
        assert_error(set_lora(files.dora), "lora_unsupported", {"path", "reason"})

        for scale, field in [(math.nan, "scale"), (math.inf, "scale"), ("1", "scale"),
                             (True, "scale")]:
            details = assert_error(set_lora(files.small, scale=scale), "lora_invalid_scale",
                                   {"field", "scale"})
            assert details["field"] == field and isinstance(details["scale"], str)
        err = peer.error("set_loras", {"context": c, "loras": [[str(files.small), "x"]]})
        details = assert_error(err, "lora_invalid_scale", {"field", "scale"})
        assert details["field"] == "loras"
        err = peer.error("set_loras", {"context": c, "loras": [[1, 2, 3]]})
        assert_error(err, "bad_request", {"field", "index"})
        err = peer.error("set_loras", {"context": c, "loras": [str(files.small), "small"]})
        assert_error(err, "bad_request", {"field", "path"})
        assert peer.call("list_loras", {"context": c}) == []


def test_speculative_errors(peer: Peer, model: dict[str, Any]) -> None:
    m = model["id"]

    def refused(spec: dict[str, Any], keys: set[str]) -> dict[str, Any]:
        err = peer.error("create_context", {"model": m, "n_ctx": 64, "speculative": spec})
        return assert_error(err, "speculative_unsupported", {"field", "reason", "mode", *keys})

    assert refused({"mode": "nope"}, {"known"})["reason"] == "unknown_mode"
    assert refused({"mode": "prompt_lookup", "x": 1},
                   {"parameter", "accepted"})["reason"] == "unknown_parameter"
    assert refused({"mode": "draft_model"}, {"parameter"})["reason"] == "missing_parameter"
    assert refused({"mode": "prompt_lookup", "max_draft": 0},
                   {"parameter"})["reason"] == "out_of_range"
    assert refused({"mode": "mtp"}, set())["reason"] == "no_mtp_heads"
    assert refused({"mode": "draft_model", "model": m}, set())["reason"] == "same_model"
    with peer.context(model=m) as ctx:
        _, end = peer.stream(peer.send("generate", {
            "context": ctx["id"], "prompt": "hello", "grammar": 'root ::= "a"',
            "speculative": {"mode": "prompt_lookup"}}))
        details = assert_error(end["error"], "speculative_unsupported",
                               {"field", "reason", "mode"})
        assert details["reason"] == "sampler_not_supported"
