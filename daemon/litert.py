"""LiteRT-LM models (``.litertlm`` bundles) through the runtime's Python API (``litert_lm``).

The one module that calls LiteRT-LM. What the runtime offers, and so what lorad can do with it
(``litert-lm-api`` 0.18.1, CPU):

- An engine per model file, and sessions on it. A session takes a prompt as text (it adds the
  start token), decodes until a stop token or its ``max_output_tokens``, and streams text
  pieces, one per token; it can be cancelled from another thread. lorad makes one session per
  request and closes it after (sessions are closed before their engine: the reverse crashed).
- Sampling: ``temperature``, ``top_k``, ``top_p`` and ``seed``. Nothing else.
- Token ids are not streamed (the pieces are text); counts come from the runtime's own
  benchmark figures.
- Speculative decoding (MTP) exists only for bundles that carry a drafter, which
  :func:`speculative_support` asks the runtime about.

Everything here blocks: callers run it in a worker thread.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LitertError, LitertLoadFailed, LitertUnavailable
from .litert_lora import read_spec

__all__ = ["BACKEND", "SUFFIX", "LitertError", "Model", "Sampling", "Session"]

BACKEND = "litert_lm"
SUFFIX = ".litertlm"
_lock = threading.Lock()
_module: Any = None


def runtime() -> Any:
    """The ``litert_lm`` module (imported once, its log quieted to errors);
    :class:`LitertUnavailable` when it is not installed."""
    global _module
    with _lock:
        if _module is None:
            try:
                import litert_lm
            except ImportError as exc:
                raise LitertUnavailable(
                    "serving .litertlm models needs the LiteRT-LM runtime "
                    f"({exc.name} is missing): pip install 'lorad[litert]'",
                    backend=BACKEND, reason="runtime_not_installed") from None
            litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
            _module = litert_lm
        return _module


def version() -> str | None:
    """The installed runtime's version (None: not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("litert-lm-api")
    except PackageNotFoundError:
        return None


def is_litertlm(path: str | Path) -> bool:
    return str(path).endswith(SUFFIX)


@dataclass(frozen=True)
class Sampling:
    """What the runtime's sampler takes (greedy: ``temperature`` 0, run as ``top_k`` 1)."""

    temperature: float
    top_k: int
    top_p: float
    seed: int

    def config(self, lm: Any) -> Any:
        if self.temperature == 0:
            return lm.SamplerConfig(top_k=1, seed=self.seed)
        return lm.SamplerConfig(top_k=self.top_k or None, top_p=self.top_p,
                                temperature=self.temperature, seed=self.seed)


@dataclass
class Counts:
    """The runtime's figures for one generation."""

    prompt_tokens: int = 0
    generated_tokens: int = 0


class Model:
    """One ``.litertlm`` file's engine (CPU). Its XNNPACK cache lives in a directory of its own,
    removed on :meth:`close` (the runtime writes it next to the model otherwise)."""

    def __init__(self, path: str, *, threads: int) -> None:
        lm = runtime()
        self.path = path
        self._cache = tempfile.mkdtemp(prefix="lorad-litert-")
        try:
            info = lm.ModelInfo(path)
            try:
                llm = info.llm
                if llm is None:
                    raise LitertLoadFailed(f"{path} holds no language model (embedding or "
                                           "other model types are not served)", path=path,
                                           backend=BACKEND)
                self.n_ctx = int(info.max_context_tokens)
                self.speculative = bool(llm.has_speculative_decoding_support())
            finally:
                info.close()
            self.lora_spec = read_spec(path)
            """The LoRA inputs lorad's converter gave the bundle (None: it takes no adapter)."""
            self.engine = lm.Engine(path, lm.Backend.CPU(thread_count=threads),
                                    cache_dir=self._cache, enable_benchmark=True)
        except LitertError:
            shutil.rmtree(self._cache, ignore_errors=True)
            raise
        except Exception as exc:  # the runtime's own failure, as text
            shutil.rmtree(self._cache, ignore_errors=True)
            raise LitertLoadFailed(f"LiteRT-LM could not load {path}: {exc}", path=path,
                                   backend=BACKEND) from None
        self.threads = threads
        self.bos = self.engine.bos_token_id
        self.stops = self.engine.eos_token_ids
        self.size = os.path.getsize(path)

    def tokenize(self, text: str) -> list[int]:
        return list(self.engine.tokenize(text))

    def detokenize(self, tokens: list[int]) -> str:
        try:
            return self.engine.detokenize(list(tokens))
        except RuntimeError:  # an id outside the vocabulary (the runtime logs which)
            raise LitertError("the runtime could not detokenize these tokens (an id outside "
                              "the vocabulary?)", backend=BACKEND) from None

    def token_text(self, token: int | None) -> str:
        return "" if token is None else self.engine.detokenize([token])

    def info(self) -> dict[str, Any]:
        spec = self.lora_spec
        return {"backend": BACKEND, "size_bytes": self.size, "n_ctx_train": self.n_ctx,
                "speculative_support": self.speculative,
                "lora_rank": spec.rank if spec else None, "runtime_version": version()}

    @property
    def cache_dir(self) -> str:
        """A directory of the daemon's own, removed with the model."""
        return self._cache

    def session(self, sampling: Sampling, max_tokens: int, *, speculative: bool,
                lora: str | None = None) -> Session:
        """A new session; ``lora``: the adapter file it applies (written by lorad)."""
        lm = runtime()
        try:
            raw = self.engine.create_session(
                apply_prompt_template=False, sampler_config=sampling.config(lm),
                max_output_tokens=max_tokens,
                enable_speculative_decoding=True if speculative else None,
                lora_config=lm.LoraConfig(lora_path=lora) if lora else None)
        except Exception as exc:
            raise LitertError(f"LiteRT-LM could not make a session: {exc}",
                              backend=BACKEND) from None
        return Session(raw)

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
        shutil.rmtree(self._cache, ignore_errors=True)


class Session:
    """One generation: :meth:`run` prefills and streams pieces, :meth:`cancel` (any thread)
    stops it within a token."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.cancelled = False

    def run(self, prompt: str, on_prefilled: Callable[[], None]) -> Iterator[str]:
        """Prefill ``prompt`` (the start token is added), then the pieces as they come."""
        try:
            self._raw.run_prefill([prompt])
            on_prefilled()
            if self.cancelled:  # during the prefill
                return
            for response in self._raw.run_decode_async():
                yield from response.texts
        except Exception as exc:
            if self.cancelled:
                return
            raise LitertError(f"LiteRT-LM failed while generating: {exc}",
                              backend=BACKEND) from None

    def cancel(self) -> None:
        """Stop the decoding within a token (nothing once the session is closed)."""
        self.cancelled = True
        raw = self._raw
        if raw is not None:
            raw.cancel_process()

    def counts(self) -> Counts:
        """The runtime's token counts of the last prefill and decode."""
        try:
            info = self._raw.get_benchmark_info()
        except Exception:  # no figures: none made
            return Counts()
        return Counts(info.last_prefill_token_count, info.last_decode_token_count)

    def close(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            raw.close()
