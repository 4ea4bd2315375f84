"""Daemon configuration: a TOML file, overridden by command-line flags.

Precedence, highest first: command-line flags, ``$LORAD_ENDPOINT`` (endpoint only), the config
file given with ``--config``, built-in defaults.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorad.protocol import ErrorCode, Limits, ProtocolError, validate_args

from .paths import adapter_dir, cache_dir, default_endpoint, model_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelSpec:
    """A model to load at start: its path, an optional alias, load parameters."""

    path: str
    alias: str | None = None
    n_gpu_layers: int = 0
    use_mmap: bool = True


@dataclass
class ContextSpec:
    """A context to create at start (always persistent). ``id`` names it for clients."""

    model: str
    id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


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


def _config_error(message: str, **details: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"config: {message}", **details)


def load_config(path: str | Path | None) -> DaemonConfig:
    """Read a TOML config file (or return the defaults for ``None``)."""
    config = DaemonConfig()
    if path is None:
        return config
    with open(path, "rb") as f:
        data = tomllib.load(f)
    known = {"endpoint", "group", "allowed_dirs", "adapter_dirs", "models", "contexts", "limits",
             "heartbeat_ms", "log_format", "log_level", "metrics_address", "curve_secret_key",
             "curve_authorized_keys", "peft_cache_dir"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _config_error(f"unknown key {unknown[0]!r}", field=unknown[0])
    for key in ("endpoint", "group", "log_format", "log_level", "metrics_address",
                "curve_secret_key", "curve_authorized_keys", "peft_cache_dir"):
        if key in data:
            setattr(config, key, str(data[key]))
    if "heartbeat_ms" in data:
        config.heartbeat_ms = int(data["heartbeat_ms"])
    if "allowed_dirs" in data:
        config.allowed_dirs = [str(Path(d).expanduser()) for d in data["allowed_dirs"]]
    if "adapter_dirs" in data:
        config.adapter_dirs = [str(Path(d).expanduser()) for d in data["adapter_dirs"]]
    for m in data.get("models", []):
        args = validate_args("load_model", m)
        config.models.append(ModelSpec(**{k: args[k] for k in ("path", "alias", "n_gpu_layers",
                                                                 "use_mmap")}))
    for c in data.get("contexts", []):
        c = dict(c)
        ctx_id = c.pop("id", None)
        validate_args("create_context", c)  # loras: [{path, scale}], [path, scale] or "path"
        model = c.pop("model")
        config.contexts.append(ContextSpec(model=model, id=ctx_id, params=c))
    if "limits" in data:
        names = {f.name for f in fields(Limits)}
        bad = sorted(set(data["limits"]) - names)
        if bad:
            raise _config_error(f"unknown limit {bad[0]!r}", field=bad[0])
        config.limits = Limits(**data["limits"])
    return config
