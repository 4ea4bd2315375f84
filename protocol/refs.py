"""How a reference to a model or an adapter is read: a file path, or a name. One rule for all."""

from __future__ import annotations

import os
from typing import Any


def looks_like_path(ref: str) -> bool:
    """``ref`` names a file (it has a ``/``, starts with ``~`` or ends in ``.gguf``); otherwise
    it is a name (a model id or alias, an adapter name looked up in the adapter directories)."""
    return "/" in ref or ref.startswith("~") or ref.endswith(".gguf")


def absolute_ref(ref: str | os.PathLike) -> str:
    """``ref`` for another process: a path (a PathLike, or what :func:`looks_like_path`
    says is one) becomes absolute, ``~`` expanded; a name stays a name. A ``~user`` that names
    no home directory here stays as it is (not a path under the working directory, as
    ``os.path.expanduser`` would leave it): the daemon refuses it with ``bad_request``."""
    if isinstance(ref, os.PathLike) or looks_like_path(ref):
        text = os.fspath(ref)
        expanded = os.path.expanduser(text)
        if expanded.startswith("~"):
            return text
        return os.path.abspath(expanded)
    return ref


def parse_lora_option(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the command line's ``--lora``): a trailing ``:number`` is the scale."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def speculative_option(mode: str | None, draft_max: int | None,
                       draft_model: str | None) -> dict[str, Any] | bool | None:
    """``--speculative MODE [--draft-max N] [--draft-model MODEL]`` as the wire's
    ``speculative`` value (``off``: False; no option: None); ``ValueError`` for a combination
    that means nothing."""
    if mode in (None, "off") and (draft_max is not None or draft_model is not None):
        raise ValueError("--draft-max and --draft-model need --speculative MODE")
    if draft_model is not None and mode != "draft_model":
        raise ValueError("--draft-model goes with --speculative draft_model")
    if mode is None:
        return None
    if mode == "off":
        return False
    spec: dict[str, Any] = {"mode": mode}
    if draft_max is not None:
        spec["max_draft"] = draft_max
    if draft_model is not None:  # the daemon says which parameters a mode lacks
        spec["model"] = absolute_ref(draft_model)
    return spec
