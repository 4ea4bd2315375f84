"""Daemon configuration: a TOML file, overridden by command-line flags.

Precedence, highest first: command-line flags (:func:`apply_overrides`), ``$LORAD_ENDPOINT``
(endpoint only), the config file given with ``--config`` (:func:`load_config`), built-in
defaults.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorad.protocol import Limits, ProtocolError, looks_like_path, validate_args

from .errors import ConfigError
from .paths import adapter_dir, cache_dir, default_endpoint, expand_user, model_dir
from .repack import MODES as REPACK_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelSpec:
    """A model to load at start: its path, an optional alias, load parameters."""

    path: str
    alias: str | None = None
    n_gpu_layers: int | None = None
    """None: every layer on a GPU build, none on a CPU one (:mod:`lorad.daemon.gpu`)."""
    use_mmap: bool = True
    chat_template: str | None = None
    """A llama.cpp built-in name or Jinja source used instead of the file's template."""


@dataclass
class ContextSpec:
    """A context to create at start (always persistent). ``id`` names it for clients."""

    model: str
    id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchingConfig:
    """How contexts of one model share batched llama contexts (``[batching]``)."""

    sequences: int = 64
    """The most contexts a batched llama context (a slab) grows to: it starts with one and
    doubles when full (the KV caches of its contexts are moved, not evaluated again)."""
    step_tokens: int = 512
    """Tokens decoded per step at most: a long prompt is fed in chunks of what is left."""
    kv_unified: bool = False
    """One KV pool for the sequences of a batched context (True) or a pool each (False)."""
    prompt_share: float = 0.5
    """While contexts of a model stream, the prompt tokens of a step may add at most this
    share to the time of their step (a long prompt then never slows a stream by more than
    half); prompts alone take the whole ``step_tokens``."""
    start_interval_s: float = 5.0
    """Beside another client's streams, a client that has run requests side by side within
    this many seconds has a new request whose prompt (at most 64 tokens) is past
    ``prompt_share`` start at once (its prompt fed whole) at most once per this many seconds;
    sooner, its prompt is held to the share like a long one (0: always at once). A client
    whose requests run one at a time starts each at once."""
    loop_share: float = 0.1
    """While a step decodes, both doors take in new messages and requests only while the event
    loop's work in that step stays under 1 ms plus this share of the step's time; the rest
    waits for the step's end (a flood of cheap messages preempted llama.cpp's threads and
    made steps up to 30x slower: see ``daemon/ingress.py``)."""
    keep_idle_s: float = 5.0
    """How long a slab of one sequence outlives its last context, for the next context of its
    kind (0: freed at once): a client that makes and closes contexts one after another then
    allocates and clears a KV cache once, not each time. Its memory stays in the budget,
    which takes it back first when it needs room."""
    pin_threads: bool = True
    """A model's decode thread runs on one core and llama.cpp's OpenMP workers of its steps on
    the others (see ``daemon/affinity.py``): left to the kernel, the team's threads at times
    shared a core while other work of the daemon ran, and a 24 ms step took up to 680 ms."""


@dataclass
class HttpSettings:
    """The HTTP door's contexts for stateless requests (``[http]``)."""

    contexts: int = 4
    """Engine-managed contexts per model (made on demand, reused by prompt prefix)."""
    n_ctx: int = 0
    """Their context size (0: the model's default, as for ``create_context``)."""
    max_queued: int = 8
    """Requests waiting per context before ``429``."""
    chat_template: str = ""
    """For chat requests that name none (``chat_template``): a llama.cpp built-in template
    name or Jinja source, used for models without a template of their own ("": none)."""
    metrics: bool = False
    """Also serve Prometheus' ``/metrics`` on the HTTP port (behind the API keys, if any)."""


@dataclass
class DaemonConfig:
    endpoint: str = field(default_factory=default_endpoint)
    group: str | None = None
    """With a group, the ipc socket is 0660 and owned by that group; else 0600."""
    allowed_dirs: list[str] = field(default_factory=lambda: [str(model_dir()), os.getcwd()])
    adapter_dirs: list[str] = field(default_factory=lambda: [str(adapter_dir())])
    peft_cache_dir: str = field(default_factory=lambda: str(cache_dir() / "peft"))
    """Where PEFT adapter directories are converted to GGUF files (once per content)."""
    """Where adapter names are looked up, in order (files there are allowed too)."""
    models: list[ModelSpec] = field(default_factory=list)
    contexts: list[ContextSpec] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    heartbeat_ms: int = 1000
    """ZMTP heartbeat interval; a silent peer is dropped after 3 intervals."""
    curve_secret_key: str | None = None
    """The daemon's CURVE certificate with its secret key (``NAME.key_secret``)."""
    curve_authorized_keys: str | None = None
    """A directory of the public certificates (``*.key``) of the clients allowed in."""
    metrics_address: str | None = None
    """Serve Prometheus metrics on this loopback HOST:PORT (None: off)."""
    log_format: str = "auto"
    log_level: str = "info"
    repack: str = "auto"
    """Weight repacking for the CPU: ``auto`` (on unless the CPU has AMX), ``on``, ``off``."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    http_address: str | None = None
    """Serve the OpenAI-compatible HTTP API on this HOST:PORT (None: off)."""
    api_keys: list[str] = field(default_factory=list)
    """Keys the HTTP API accepts (``Authorization: Bearer``); required off loopback."""
    cors_origins: list[str] = field(default_factory=list)
    """Origins allowed by CORS on the HTTP API (none: CORS off)."""
    http: HttpSettings = field(default_factory=HttpSettings)


_AT_LEAST_ONE = {"template_workers", "template_memory_bytes", "file_workers", "text_workers",
                 "max_file_ops_per_client", "max_text_ops_per_client",
                 "max_adapter_file_bytes"}
"""Limits for which 0 would mean something else than a limit (no worker; no memory bound)."""


def _home(ref: str, field: str) -> Path:
    """``ref`` with ``~``/``~user`` expanded; :class:`ConfigError` for a user with no home."""
    try:
        return expand_user(ref, field)
    except ProtocolError as exc:
        raise ConfigError(exc.message, field=field) from None


MAX_TEMPLATE_FILE = 1 << 20
"""Bytes of a chat template file (``--chat-template FILE``)."""


def _template_option(value: str) -> str:
    """``--chat-template``'s value: Jinja source read from the file it names, else the value
    itself (a llama.cpp built-in name, checked when the model loads, or Jinja source)."""
    if "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        if "/" in value or value.endswith((".jinja", ".j2", ".txt")):
            raise ConfigError(f"--chat-template {value!r}: no such file", field="chat_template")
        return value
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEMPLATE_FILE + 1)
        if len(data) > MAX_TEMPLATE_FILE:
            raise ConfigError(f"--chat-template {value!r}: larger than {MAX_TEMPLATE_FILE} "
                              "bytes", field="chat_template")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--chat-template {value!r}: cannot read it as UTF-8 text ({exc})",
                          field="chat_template") from None
    if not text.strip():
        raise ConfigError(f"--chat-template {value!r}: the file is empty",
                          field="chat_template")
    return text


def _config_error(message: str, **details: Any) -> ConfigError:
    return ConfigError(f"config: {message}", **details)


def load_config(path: str | Path | None) -> DaemonConfig:
    """Read a TOML config file (or return the defaults for ``None``)."""
    config = DaemonConfig()
    if path is None:
        return config
    with open(path, "rb") as f:
        data = tomllib.load(f)
    known = {"endpoint", "group", "allowed_dirs", "adapter_dirs", "models", "contexts", "limits",
             "heartbeat_ms", "log_format", "log_level", "metrics_address", "curve_secret_key",
             "curve_authorized_keys", "peft_cache_dir", "repack", "batching", "http_address",
             "api_keys", "api_key_file", "cors_origins", "http"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _config_error(f"unknown key {unknown[0]!r}", field=unknown[0])
    for key in ("endpoint", "group", "log_format", "log_level", "metrics_address",
                "curve_secret_key", "curve_authorized_keys", "peft_cache_dir", "repack",
                "http_address"):
        if key in data:
            setattr(config, key, str(data[key]))
    if config.repack not in REPACK_MODES:
        raise _config_error(f"repack must be one of {', '.join(REPACK_MODES)}",
                            field="repack")
    if "heartbeat_ms" in data:
        config.heartbeat_ms = int(data["heartbeat_ms"])
    if "allowed_dirs" in data:
        config.allowed_dirs = [str(_home(d, "allowed_dirs")) for d in data["allowed_dirs"]]
    if "adapter_dirs" in data:
        config.adapter_dirs = [str(_home(d, "adapter_dirs")) for d in data["adapter_dirs"]]
    for m in data.get("models", []):
        args = validate_args("load_model", m)
        config.models.append(ModelSpec(**{k: args[k] for k in (
            "path", "alias", "n_gpu_layers", "use_mmap", "chat_template")}))
    for c in data.get("contexts", []):
        c = dict(c)
        ctx_id = c.pop("id", None)
        validate_args("create_context", c)  # loras: [{path, scale}], [path, scale] or "path"
        model = c.pop("model")
        config.contexts.append(ContextSpec(model=model, id=ctx_id, params=c))
    if "batching" in data:
        config.batching = _batching(data["batching"])
    for key in ("api_keys", "cors_origins"):
        if key in data:
            value = data[key]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise _config_error(f"{key} must be a list of non-empty strings", field=key)
            setattr(config, key, list(value))
    if "api_key_file" in data:
        config.api_keys += read_api_keys(str(data["api_key_file"]))
    if "http" in data:
        config.http = _http(data["http"])
    if "limits" in data:
        names = {f.name for f in fields(Limits)}
        bad = sorted(set(data["limits"]) - names)
        if bad:
            raise _config_error(f"unknown limit {bad[0]!r}", field=bad[0])
        for name, value in data["limits"].items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _config_error(f"limit {name!r} must be a whole number >= 0",
                                    field=name)
            if value == 0 and name in _AT_LEAST_ONE:
                raise _config_error(f"limit {name!r} must be at least 1", field=name)
        config.limits = Limits(**data["limits"])
    return config


def _table(name: str, table: Any, kind: type, ranges: dict[str, tuple[int, int]]) -> Any:
    """A config table as ``kind`` (a dataclass): known keys only, whole numbers in range."""
    if not isinstance(table, dict):
        raise _config_error(f"{name} must be a table", field=name)
    bad = sorted(set(table) - {f.name for f in fields(kind)})
    if bad:
        raise _config_error(f"unknown {name} setting {bad[0]!r}", field=bad[0])
    out = kind(**table)
    for key, (lo, hi) in ranges.items():
        value = getattr(out, key)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _config_error(f"{name}.{key} must be a whole number in {lo}..{hi}",
                                field=key)
    return out


def _batching(table: Any) -> BatchingConfig:
    out = _table("batching", table, BatchingConfig,
                 {"sequences": (1, 256), "step_tokens": (16, 1 << 16)})
    for name in ("kv_unified", "pin_threads"):
        if not isinstance(getattr(out, name), bool):
            raise _config_error(f"batching.{name} must be true or false", field=name)
    for name, lo, hi, what in (("prompt_share", 0.05, 1000, "a number"),
                               ("loop_share", 0.01, 100, "a number"),
                               ("start_interval_s", 0, 3600, "a number of seconds"),
                               ("keep_idle_s", 0, 3600, "a number of seconds")):
        value = getattr(out, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not lo <= value <= hi:
            raise _config_error(f"batching.{name} must be {what} in {lo}..{hi}", field=name)
        setattr(out, name, float(value))
    return out


def _http(table: Any) -> HttpSettings:
    out = _table("http", table, HttpSettings,
                 {"contexts": (1, 256), "n_ctx": (0, 1 << 20), "max_queued": (0, 1024)})
    if not isinstance(out.chat_template, str):
        raise _config_error("http.chat_template must be a string", field="chat_template")
    if not isinstance(out.metrics, bool):
        raise _config_error("http.metrics must be true or false", field="metrics")
    return out


def read_api_keys(path: str) -> list[str]:
    """API keys from a file: one per line; blank lines and ``#`` comments skipped."""
    try:
        text = _home(path, "api_key_file").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"api key file {path!r}: {exc}", field="api_key_file") from None
    keys = [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ConfigError(f"api key file {path!r} has no key", field="api_key_file")
    return keys


DEFAULT_CONTEXT = "default"
"""The context ``--model``, ``--lora`` and ``--speculative`` configure."""


def _resolve(ref: str) -> str:
    """A model or adapter reference given on the command line: a path becomes absolute (the
    daemon's rule, :func:`~lorad.protocol.looks_like_path`); a name stays a name."""
    return str(Path(os.path.expanduser(ref)).resolve()) if looks_like_path(ref) else ref


def apply_overrides(
    config: DaemonConfig,
    *,
    endpoint: str | None = None,
    group: str | None = None,
    allow_dir: Iterable[str] | None = None,
    adapter_dir: Iterable[str] | None = None,
    log_format: str | None = None,
    log_level: str | None = None,
    n_gpu_layers: int | None = None,
    metrics_address: str | None = None,
    curve_secret_key: str | None = None,
    curve_authorized_keys: str | None = None,
    heartbeat_ms: int | None = None,
    repack: str | None = None,
    http_address: str | None = None,
    api_key_file: str | None = None,
    model: str | None = None,
    alias: str | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    speculative: dict[str, Any] | bool | None = None,
    loras: Iterable[tuple[str, float]] | None = None,
    chat_template: str | None = None,
    http_metrics: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> DaemonConfig:
    """Apply ``lorad serve``'s flags to ``config`` (in place; also returned). A flag that is
    None (or empty) leaves the config file's setting.

    ``allow_dir`` is added to the allowed directories; ``adapter_dir`` comes before the
    config's adapter directories; ``model`` is preloaded (its directory allowed) with the
    persistent context ``default`` on it (``n_ctx``, ``threads``; the config's stack of
    ``default`` is kept); ``speculative`` (a speculative spec, or False for off) and ``loras``
    (``(path or name, scale)`` pairs, the whole stack) replace the settings of ``default``,
    which must exist: :class:`ConfigError` otherwise. ``chat_template`` (a built-in name,
    Jinja source, or a file holding Jinja) is the chat template of ``model``, or without it of
    every model of the config file. Without ``endpoint``, ``$LORAD_ENDPOINT`` beats the config
    file.
    """
    if endpoint:
        config.endpoint = endpoint
    elif environ.get("LORAD_ENDPOINT"):
        config.endpoint = environ["LORAD_ENDPOINT"]
    if group:
        config.group = group
    if allow_dir:
        config.allowed_dirs = [*config.allowed_dirs, *allow_dir]
    if adapter_dir:
        config.adapter_dirs = [*(str(_home(d, "adapter_dir")) for d in adapter_dir),
                               *config.adapter_dirs]
    for name, value in (("log_format", log_format), ("log_level", log_level),
                        ("metrics_address", metrics_address),
                        ("curve_secret_key", curve_secret_key),
                        ("curve_authorized_keys", curve_authorized_keys),
                        ("heartbeat_ms", heartbeat_ms), ("repack", repack),
                        ("http_address", http_address)):
        if value:
            setattr(config, name, value)
    if api_key_file:
        config.api_keys = [*config.api_keys, *read_api_keys(api_key_file)]
    if http_metrics:
        config.http.metrics = True
    if config.http.metrics and not config.http_address:  # the flag, or [http] metrics
        raise ConfigError("--http-metrics ([http] metrics) serves /metrics on the HTTP door: "
                          "give --http HOST:PORT (http_address) too", field="http_metrics")
    if n_gpu_layers is not None and (not model or not -1 <= n_gpu_layers <= 100000):
        raise _config_error("--n-gpu-layers needs --model (it is that model's) and a value in "
                            "-1..100000 (-1: every layer)", field="n_gpu_layers")
    if model:
        model_path = str(_home(model, "model").resolve())
        config.allowed_dirs.append(str(Path(model_path).parent))
        config.models.append(ModelSpec(path=model_path, alias=alias, n_gpu_layers=n_gpu_layers))
    if chat_template:
        template = _template_option(chat_template)
        targets = config.models[-1:] if model else config.models
        if not targets:
            raise ConfigError("--chat-template applies to the models loaded at start: give "
                              "--model, or models in the config file", field="chat_template")
        for spec in targets:
            spec.chat_template = template
    if model:
        ctx_params: dict[str, Any] = {}
        if n_ctx:
            ctx_params["n_ctx"] = n_ctx
        if threads:
            ctx_params["n_threads"] = threads
        old = next((c for c in config.contexts if c.id == DEFAULT_CONTEXT), None)
        if old is not None and "loras" in old.params:
            ctx_params["loras"] = old.params["loras"]
        config.contexts = [c for c in config.contexts if c.id != DEFAULT_CONTEXT]
        config.contexts.append(ContextSpec(model=model_path, id=DEFAULT_CONTEXT,
                                           params=ctx_params))
    loras = list(loras or [])
    default = next((c for c in config.contexts if c.id == DEFAULT_CONTEXT), None)
    for flag, given in (("--speculative", speculative is not None), ("--lora", bool(loras)),
                        ("--n-ctx", bool(n_ctx) and not model),
                        ("--threads", bool(threads) and not model)):
        if given and default is None:
            raise ConfigError(f"{flag} applies to the context 'default': give --model, or "
                              "define a context with id = \"default\" in the config file",
                              field=flag.lstrip("-"))
    if not model and default is not None:  # the config file's default context
        if n_ctx:
            default.params["n_ctx"] = n_ctx
        if threads:
            default.params["n_threads"] = threads
    if speculative is not None:
        default.params["speculative"] = speculative
    if loras:
        default.params["loras"] = [{"path": _resolve(p), "scale": s} for p, s in loras]
    return config
