"""How a reference to a model or an adapter is read: a file path, or a name. One rule for all."""

from __future__ import annotations


def looks_like_path(ref: str) -> bool:
    """``ref`` names a file (it has a ``/``, starts with ``~`` or ends in ``.gguf``); otherwise
    it is a name (a model id or alias, an adapter name looked up in the adapter directories)."""
    return "/" in ref or ref.startswith("~") or ref.endswith(".gguf")
