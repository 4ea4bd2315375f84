"""What each client method sends: one builder per operation, shared by both clients.

A builder turns a method's arguments into a :class:`Call` (operation, wire arguments, which
timeout bounds it, which part of the result the method returns); the sync and trio shells run
it. Adding an operation to the clients is one builder here and one line in each shell.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, NamedTuple

from lorad.protocol import RequestId
from lorad.protocol.refs import absolute_ref

from .errors import NotFound


class Call(NamedTuple):
    """One request as a client method makes it."""

    op: str
    args: dict[str, Any]
    slow: bool = False
    """Bounded by the client's ``load_timeout`` instead of its ``timeout``."""
    timeout: float | None = None
    """An explicit bound for this call (seconds), over both."""
    key: str | None = None
    """The method returns this field of the result (else the whole result)."""

    def timeout_for(self, timeout: float, load_timeout: float) -> float:
        if self.timeout is not None:
            return self.timeout
        return load_timeout if self.slow else timeout

    def pick(self, result: Any) -> Any:
        return result[self.key] if self.key is not None else result


# -- argument helpers ------------------------------------------------------------------------------
def lora_ref(path: str | os.PathLike) -> str:
    """An adapter reference for the daemon: a name stays a name (looked up in the daemon's
    adapter directories); a path (a PathLike, or a string with ``/``, a leading ``~`` or a
    ``.gguf`` suffix) becomes absolute, since the daemon's working directory is not ours."""
    return absolute_ref(path)


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


def drop_none(**kwargs: Any) -> dict[str, Any]:
    """Arguments without the ``None`` ones; a ``loras`` stack in its wire form."""
    out = {k: v for k, v in kwargs.items() if v is not None}
    if "loras" in out:
        out["loras"] = lora_stack(out["loras"])
    return out


def model_ref(model: str | dict | os.PathLike) -> str:
    """A model for the daemon: an id, a path, or a load_model() result (its id)."""
    if isinstance(model, dict):
        return model["id"]
    return os.fspath(model)


def context_args(model: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Arguments of create_context: ``model`` is an id, a path, or a load_model() result."""
    args = {"model": model_ref(model)}
    args.update({k: v for k, v in params.items() if v is not None})
    if "loras" in args:
        args["loras"] = lora_stack(args["loras"])
    return args


# -- the daemon ------------------------------------------------------------------------------------
def simple(op: str, timeout: float | None = None) -> Call:
    """ping, status, capabilities, metrics, list_models, list_contexts: no arguments."""
    return Call(op, {}, timeout=timeout)


def load_model(path: str | os.PathLike, params: dict[str, Any], progress: bool = False) -> Call:
    args = {"path": os.fspath(path), **drop_none(**params)}
    return Call("load_model", {**args, "progress": True} if progress else args, slow=True)


def unload_model(model: str | dict, force: bool) -> Call:
    return Call("unload_model", {"model": model_ref(model), "force": force})


def create_context(model: str | os.PathLike | dict, params: dict[str, Any]) -> Call:
    return Call("create_context", context_args(model, params), slow=True)


def find_context(contexts: list[dict[str, Any]], context_id: str) -> dict[str, Any]:
    """The info of ``context_id`` in a list_contexts() result, or :class:`NotFound`."""
    for info in contexts:
        if info["id"] == context_id:
            return info
    raise NotFound(f"no context {context_id!r}", {"context": context_id})


def tokenize(text: str, params: dict[str, Any], **target: str) -> Call:
    """``target`` is ``model=`` or ``context=``."""
    return Call("tokenize", {**target, "text": text, **drop_none(**params)})


def detokenize(tokens: Iterable[int], **target: str) -> Call:
    return Call("detokenize", {**target, "tokens": list(tokens)})


def embed(input: str | Iterable[str], normalize: bool, model: str | dict | os.PathLike | None,
          context: str | None) -> Call:
    """One vector per input, from ``model`` or from ``context``'s model and adapter stack."""
    texts = input if isinstance(input, str) else list(input)
    return Call("embed", drop_none(model=None if model is None else model_ref(model),
                                   context=context, input=texts, normalize=normalize))


def validate_lora(model: str | dict | os.PathLike, path: str | os.PathLike) -> Call:
    return Call("validate_lora", {"model": model_ref(model), "path": lora_ref(path)},
                slow=True)


def name_lora(name: str, path: str | os.PathLike, replace: bool) -> Call:
    return Call("name_lora", {"name": name, "path": lora_ref(path), "replace": replace},
                slow=True)


def unname_lora(name: str) -> Call:
    return Call("unname_lora", {"name": name})


def cancel(request_id: RequestId) -> Call:
    return Call("cancel", {"request": request_id})


# -- a context -------------------------------------------------------------------------------------
def generate(context_id: str, prompt: str | None, tokens: list[int] | None,
             params: dict[str, Any], timeout: float | None) -> Call:
    args = {"context": context_id, **drop_none(prompt=prompt, tokens=tokens, **params)}
    return Call("generate", args, timeout=timeout)


def chat(context_id: str, messages: list[dict[str, str]], params: dict[str, Any],
         timeout: float | None) -> Call:
    args = {"context": context_id, "messages": messages, **drop_none(**params)}
    return Call("chat", args, timeout=timeout)


def set_lora(context_id: str, path: str | os.PathLike, scale: float) -> Call:
    args = {"context": context_id, "path": lora_ref(path), "scale": scale}
    return Call("set_lora", args, slow=True, key="loras")


def remove_lora(context_id: str, path: str | os.PathLike) -> Call:
    return Call("remove_lora", {"context": context_id, "path": lora_ref(path)}, key="loras")


def clear_loras(context_id: str) -> Call:
    return Call("clear_loras", {"context": context_id}, key="loras")


def set_loras(context_id: str, loras: Iterable[LoraItem]) -> Call:
    args = {"context": context_id, "loras": lora_stack(loras)}
    return Call("set_loras", args, slow=True, key="loras")


def list_loras(context_id: str) -> Call:
    return Call("list_loras", {"context": context_id})


def close_context(context_id: str) -> Call:
    return Call("close_context", {"context": context_id})
