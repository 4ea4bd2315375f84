"""The one module that calls llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Everything above it works with :class:`Model`, :class:`Slab` (and its :class:`Sequence`),
:class:`Context` and :class:`Sampler`. All calls
here block: the daemon runs them in worker threads, one context in one thread at a time.

Safety decision: ``use_extra_bufts`` (weight repacking) is decided per CPU at start
(:mod:`lorad.daemon.repack`). On Xeons with AMX a native llama.cpp build (pip's default)
crashed in ``llama_decode`` on Q4_K models through the AMX "extra buffer" repacking path, so
models load without it there; elsewhere (AVX2 EPYCs) repacking is on, about 9 % faster.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as C
import numpy as np

from .errors import (
    AdapterLoadFailed,
    BadGrammar,
    BadKvType,
    ContextFailed,
    ContextFull,
    LlamaError,
    LoadCancelled,
    ModelLoadFailed,
    NoRollback,
    NotEmbeddingModel,
    UnknownTemplate,
)

# -- memory ------------------------------------------------------------------------------------
try:
    _libc = ctypes.CDLL("libc.so.6")
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def release_free_memory() -> None:
    """Give freed heap pages back to the system (glibc keeps them otherwise): called after a
    context or an adapter is freed, so that the daemon's RSS comes back down."""
    if _malloc_trim is not None:
        _malloc_trim(0)


# -- logging -----------------------------------------------------------------------------------
_log_lines: deque[str] = deque(maxlen=200)
_capture = threading.local()
_LEVELS = {1: "error", 2: "warn", 3: "info", 4: "debug", 5: "cont"}


@C.llama_log_callback
def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", "replace") if text else ""
    _log_lines.append(line)
    lines = getattr(_capture, "lines", None)
    if lines is not None:
        lines.append(line)


class capture_log:
    """Collect llama.cpp's log lines emitted by this thread while the block runs."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        _capture.lines = self.lines
        return self.lines

    def __exit__(self, *exc: object) -> None:
        _capture.lines = None


def _relevant(lines: list[str], limit: int = 20) -> list[str]:
    text = "".join(lines).splitlines()
    picked = [ln for ln in text if any(w in ln.lower() for w in ("error", "fail", "invalid",
                                                                  "unknown", "mismatch"))]
    return (picked or text)[-limit:]


_initialised = False


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its log into lorad."""
    global _initialised
    if not _initialised:
        C.llama_log_set(_on_log, None)
        C.llama_backend_init()
        _initialised = True


def supports_gpu_offload() -> bool:
    """Whether this build of llama.cpp has a backend layers can be offloaded to."""
    init_backend()
    return bool(C.llama_supports_gpu_offload())


def system_info() -> dict[str, Any]:
    init_backend()
    return {
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "system_info": C.llama_print_system_info().decode("utf-8", "replace").strip(),
        "gpu_offload": supports_gpu_offload(),
        "mmap": bool(C.llama_supports_mmap()),
    }


def builtin_chat_templates() -> list[str]:
    """Names of the chat templates llama.cpp itself implements (``chatml``, ``gemma``, ...)."""
    n = C.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * n)()
    C.llama_chat_builtin_templates(names, n)
    return [name.decode() for name in names]


def check_builtin_chat_template(name: str, field: str = "template") -> None:
    """``bad_request`` (``field``, ``builtin``) unless ``name`` is one of llama.cpp's."""
    names = builtin_chat_templates()
    if name not in names:
        raise UnknownTemplate(f"unknown chat template {name!r}: give a llama.cpp built-in "
                              f"name ({', '.join(names)}) or Jinja source", field=field,
                              builtin=names)


def apply_builtin_chat_template(name: str, messages: list[dict[str, str]],
                                add_generation_prompt: bool) -> str:
    """Format ``messages`` with llama.cpp's built-in template ``name``."""
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (C.llama_chat_message * len(keep))(*[C.llama_chat_message(r, c) for r, c in keep])
    size = 256 + sum(len(r) + len(c) for r, c in keep) * 2
    while True:
        buf = ctypes.create_string_buffer(size)
        n = C.llama_chat_apply_template(name.encode(), chat, len(keep), add_generation_prompt,
                                        buf, size)
        if n < 0:
            raise UnknownTemplate(f"unknown chat template {name!r}", field="template",
                                  builtin=builtin_chat_templates())
        if n <= size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n


# -- models ------------------------------------------------------------------------------------
class TooManyTokens(Exception):
    """A text has more tokens than the caller's limit (``n``: how many it has; with
    ``at_least``, a lower bound: the text was too long to be worth tokenizing)."""

    def __init__(self, n: int, at_least: bool = False) -> None:
        super().__init__(f"{'at least ' if at_least else ''}{n} tokens")
        self.n = n
        self.at_least = at_least

    def count(self) -> str:
        """``n`` in words: "N" or "at least N"."""
        return f"at least {self.n}" if self.at_least else str(self.n)


class Model:
    """A loaded llama_model: weights shared by every context created on it."""

    def __init__(self, path: str, *, n_gpu_layers: int = 0, use_mmap: bool = True,
                 progress: Callable[[float], bool] | None = None, repack: bool = False) -> None:
        """``progress(fraction)`` is called while loading; returning False aborts the load.
        ``repack`` lets llama.cpp repack weights for the CPU (see :mod:`.repack`)."""
        init_backend()
        params = C.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.load_mode = C.LLAMA_LOAD_MODE_MMAP if use_mmap else C.LLAMA_LOAD_MODE_NONE
        params.use_extra_bufts = repack  # see module docstring
        aborted = False
        if progress is not None:
            def on_progress(fraction: float, _user: ctypes.c_void_p) -> bool:
                nonlocal aborted
                aborted = not progress(float(fraction))
                return not aborted

            callback = C.llama_progress_callback(on_progress)  # alive until the load returns
            params.progress_callback = callback
        with capture_log() as lines:
            ptr = C.llama_model_load_from_file(path.encode(), params)
        if not ptr and aborted:
            raise LoadCancelled(f"loading {path!r} was cancelled", path=path)
        if not ptr:
            raise ModelLoadFailed(f"llama.cpp could not load {path!r}", path=path,
                                  log=_relevant(lines))
        self.ptr = ptr
        self.path = path
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        self.bos = C.llama_vocab_bos(self.vocab)
        self.eos = C.llama_vocab_eos(self.vocab)
        self._pieces: dict[int, bytes] = {}
        self.longest_piece = self._longest_piece()
        """The most bytes of a text that one token stands for (:meth:`tokenize`'s bound), or
        None where the tokenizer does not keep every byte of a text."""

    def _longest_piece(self) -> int | None:
        """An upper bound of the bytes of a text one token stands for, where the tokenizer keeps
        every byte of a text (SPM and BPE vocabularies with no token that strips the whitespace
        next to it); None elsewhere (WPM and UGM fold or drop whitespace). A token's text as
        stored is never shorter than what it stands for (SPM's "▁" is a space, BPE's byte
        characters one byte each, "<0x0A>" one byte): 48 bytes on gemma 3, whose 262,144 tokens
        are read in 0.2 s as the model loads (the first over-long prompts of a flood read them
        on two tokenizing threads at once, at 2.6 s of CPU, while it was done on demand)."""
        if C.llama_vocab_type(self.vocab) not in (C.LLAMA_VOCAB_TYPE_SPM,
                                                  C.LLAMA_VOCAB_TYPE_BPE):
            return None
        strips = C.LLAMA_TOKEN_ATTR_LSTRIP | C.LLAMA_TOKEN_ATTR_RSTRIP
        vocab, text, attr = self.vocab, C.llama_vocab_get_text, C.llama_vocab_get_attr
        if any(attr(vocab, token) & strips for token in range(self.n_vocab)):
            return None
        return max((len(text(vocab, token) or b"") for token in range(self.n_vocab)),
                   default=0) or None

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def chat_template(self) -> str | None:
        tmpl = C.llama_model_chat_template(self.ptr, None)
        return tmpl.decode("utf-8", "replace") if tmpl else None

    def info(self) -> dict[str, Any]:
        desc = ctypes.create_string_buffer(256)
        C.llama_model_desc(self.ptr, desc, len(desc))
        return {
            "architecture": self.meta("general.architecture"),
            "name": self.meta("general.name"),
            "description": desc.value.decode("utf-8", "replace"),
            "n_params": int(C.llama_model_n_params(self.ptr)),
            "size_bytes": int(C.llama_model_size(self.ptr)),
            "n_ctx_train": int(C.llama_model_n_ctx_train(self.ptr)),
            "n_vocab": int(self.n_vocab),
            "n_embd": int(C.llama_model_n_embd(self.ptr)),
            "n_layer": int(C.llama_model_n_layer(self.ptr)),
            "chat_template": self.chat_template is not None,
        }

    def kv_widths(self) -> tuple[int, int, int]:
        """``(n_layer, n_embd_k, n_embd_v)``: the elements a KV cell holds per layer for keys
        and for values (head length x KV heads)."""
        arch = self.meta("general.architecture") or ""
        n_head = max(1, int(C.llama_model_n_head(self.ptr)))
        n_head_kv = max(1, int(C.llama_model_n_head_kv(self.ptr)))
        n_embd = int(C.llama_model_n_embd(self.ptr))

        def length(key: str) -> int:
            value = self.meta(f"{arch}.attention.{key}")
            return int(value) if value and value.isdigit() else n_embd // n_head

        return (int(C.llama_model_n_layer(self.ptr)), length("key_length") * n_head_kv,
                length("value_length") * n_head_kv)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False,
                 limit: int | None = None) -> list[int]:
        """The tokens of ``text``; :class:`TooManyTokens` when there are more than ``limit``
        (counted in C: no list of millions of tokens is built while holding the GIL). A text
        longer than ``limit`` times the vocabulary's longest piece is refused untokenized (at
        least that many tokens): tokenizing 4 MiB took 1.6 s of a core on gemma 3."""
        data = text.encode("utf-8")
        longest = self.longest_piece
        if limit is not None and longest is not None and len(data) > longest * limit:
            raise TooManyTokens(-(-len(data) // longest), at_least=True)
        n_max = len(data) + 8 if limit is None else min(len(data) + 8, limit + 1)
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0 or (limit is not None and n > limit):
            needed = -n if n < 0 else n
            if limit is not None and needed > limit:
                raise TooManyTokens(needed)
            n_max = needed
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special,
                                 parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        out = buf.raw[:n]
        self._pieces[token] = out
        return out

    def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens``: their pieces joined, nothing stripped (special tokens render
        as nothing). One C call (``llama_detokenize``) rather than a call per token, so that a
        long list does not hold the GIL token by token; it drops the first piece's leading space
        on vocabularies that add a space prefix, which is put back."""
        if not tokens:
            return ""
        if self._cleans_spaces:  # llama_detokenize would also rewrite " ," and the like
            return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")
        text = self._detokenize(tokens)
        if self._detokenize(tokens[:1]) != self.piece(tokens[0]):
            text = b" " + text  # the space prefix llama_detokenize removed from the first piece
        return text.decode("utf-8", "replace")

    def _detokenize(self, tokens: list[int]) -> bytes:
        n = len(tokens)
        ids = (C.llama_token * n)(*tokens)
        size = 8 * n + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            got = C.llama_detokenize(self.vocab, ids, n, buf, size, False, False)
            if got >= 0:
                return buf.raw[:got]
            size = -got
        raise LlamaError("llama_detokenize failed")

    @property
    def _cleans_spaces(self) -> bool:
        return (self.meta("tokenizer.ggml.clean_spaces") or "false").lower() == "true"

    def token_text(self, token: int) -> str:
        """The vocabulary text of a token, specials included (for templates)."""
        return (C.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", "replace")

    @property
    def n_embd(self) -> int:
        return int(C.llama_model_n_embd(self.ptr))

    @property
    def pooling_type(self) -> int | None:
        """The pooling type the GGUF declares (``<arch>.pooling_type``), if any."""
        value = self.meta(f"{self.meta('general.architecture')}.pooling_type")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    @property
    def n_nextn(self) -> int:
        """Number of multi-token-prediction (MTP) layers; 0 for most models."""
        return int(C.llama_model_n_layer_nextn(self.ptr))

    @property
    def can_roll_back(self) -> bool:
        """Whether cached tokens can be removed one by one (not so for recurrent memory)."""
        return not (C.llama_model_is_recurrent(self.ptr) or C.llama_model_is_hybrid(self.ptr))

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None


# -- LoRA adapters -----------------------------------------------------------------------------
class Adapter:
    """A LoRA adapter loaded for one :class:`Model` (``llama_adapter_lora_init``).

    Callers check the file first (``lora.py``); a NULL from llama.cpp anyway becomes
    ``lora_load_failed`` with llama.cpp's own log lines. Loading and freeing adapters of one
    model must not run concurrently (llama.cpp keeps them in a per-model set).
    """

    def __init__(self, model: Model, path: str) -> None:
        with capture_log() as lines:
            ptr = C.llama_adapter_lora_init(model.ptr, path.encode())
        if not ptr:  # a NULL pointer object is falsy, not None
            raise AdapterLoadFailed(f"llama.cpp could not load adapter {path!r}", path=path,
                                    log=_relevant(lines))
        self.ptr = ptr
        self.path = path
        n = int(C.llama_adapter_get_alora_n_invocation_tokens(ptr))
        tokens = C.llama_adapter_get_alora_invocation_tokens(ptr) if n else None
        self.alora_invocation_tokens = [int(tokens[i]) for i in range(n)] if n else None

    def free(self) -> None:
        if self.ptr:
            C.llama_adapter_lora_free(self.ptr)
            self.ptr = None
            release_free_memory()


KV_TYPES = {"f32": C.GGML_TYPE_F32, "f16": C.GGML_TYPE_F16, "q8_0": C.GGML_TYPE_Q8_0}
"""KV cache element types a context may ask for (f16 is llama.cpp's default)."""


# -- contexts ----------------------------------------------------------------------------------
def _new_context(model: Model, params: Any, *, n_ctx: int, n_seq: int, n_batch: int,
                 n_threads: int, kv_type: str, flash_attn: bool | None) -> Any:
    """``llama_init_from_model`` with ``params`` completed; typed errors for a NULL."""
    params.type_k = params.type_v = KV_TYPES[kv_type]
    # None: llama.cpp decides (on for the CPU backend). Flash attention computes in f16,
    # whatever the KV type: exact-math comparisons need it off and an f32 cache.
    params.flash_attn_type = -1 if flash_attn is None else int(flash_attn)
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = n_seq
    params.n_threads = n_threads
    params.n_threads_batch = n_threads
    params.no_perf = True
    with capture_log() as lines:
        ptr = C.llama_init_from_model(model.ptr, params)
    if not ptr and kv_type not in ("f16", "f32"):
        raise BadKvType(
            f"llama.cpp could not create a context with kv_type={kv_type!r} for this model "
            "(a quantized KV cache needs head sizes that are a multiple of its block size); "
            "use f16 or f32", field="kv_type", log=_relevant(lines))
    if not ptr:
        raise ContextFailed("llama.cpp could not create the context", log=_relevant(lines))
    return ptr


def _set_adapters(ctx_ptr: Any, stack: list[tuple[Adapter, float]]) -> None:
    """``llama_set_adapters_lora`` with the whole stack (empty: no adapters)."""
    n = len(stack)
    if n:
        ptrs = (C.llama_adapter_lora_p_ctypes * n)(*[a.ptr for a, _ in stack])
        scales = (ctypes.c_float * n)(*[s for _, s in stack])
        rc = C.llama_set_adapters_lora(ctx_ptr, ptrs, n, scales)
    else:
        rc = C.llama_set_adapters_lora(ctx_ptr, None, 0, None)
    if rc != 0:
        raise AdapterLoadFailed(f"llama_set_adapters_lora failed with code {rc}", rc=rc)


class Context:
    """One single-sequence llama_context on a shared :class:`Model`: a model's embedding
    context and a context's draft-model context (generation contexts are :class:`Slab`
    sequences).

    ``tokens`` mirrors what sequence 0 of the KV cache holds, so that a new prompt that shares a
    prefix with it re-evaluates only the rest.
    """

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_threads: int,
                 kv_type: str = "f16", flash_attn: bool | None = None,
                 embeddings: bool = False) -> None:
        params = C.llama_context_default_params()
        self.pooling: str | None = None
        """With ``embeddings``: how token vectors become one (the model's own pooling type
        where its GGUF declares one, else ``mean``)."""
        if embeddings:
            declared = model.pooling_type
            if declared == C.LLAMA_POOLING_TYPE_RANK:
                raise NotEmbeddingModel("this is a reranking model (pooling type rank): it "
                                        "scores pairs, it has no embeddings", field="model")
            pooling = declared if declared in POOLING_NAMES else C.LLAMA_POOLING_TYPE_MEAN
            params.embeddings = True
            params.pooling_type = pooling
            self.pooling = POOLING_NAMES[pooling]
            n_batch = n_ctx  # a pooled sequence must fit in one ubatch
        ptr = _new_context(model, params, n_ctx=n_ctx, n_seq=1, n_batch=n_batch,
                           n_threads=n_threads, kv_type=kv_type, flash_attn=flash_attn)
        self.ptr = ptr
        self.model = model
        self.n_ctx = int(C.llama_n_ctx(ptr))
        self.n_batch = n_batch
        self.memory = C.llama_get_memory(ptr)
        self.tokens: list[int] = []
        self._batch = C.llama_batch_init(n_batch, 0, 1)
        self._adapters: tuple[tuple[int, float], ...] = ()

    def embed(self, tokens: list[int]) -> np.ndarray:
        """The pooled embedding of ``tokens`` (a context made with ``embeddings=True``); the
        KV cache is cleared before and after."""
        self.clear()
        try:
            self._decode(tokens, want_logits=False, all_logits=True)
            ptr = C.llama_get_embeddings_seq(self.ptr, 0)
            if not ptr:
                raise LlamaError("llama.cpp returned no pooled embedding")
            return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).copy()
        finally:
            self.clear()

    # LoRA ------------------------------------------------------------------------------------
    def set_adapters(self, stack: list[tuple[Adapter, float]]) -> bool:
        """Make ``stack`` the context's adapters (the whole stack at once).

        The KV cache was computed under the previous stack, so it is cleared whenever the stack
        (an adapter or a scale) changes. Returns whether it changed.
        """
        key = stack_key(stack)
        if key == self._adapters:
            return False
        _set_adapters(self.ptr, stack)
        self.clear()
        self._adapters = key
        return True

    # KV cache ------------------------------------------------------------------------------
    def clear(self) -> None:
        C.llama_memory_clear(self.memory, True)
        self.tokens = []

    def _truncate(self, n: int) -> None:
        """Keep the first ``n`` cached tokens (falls back to a full clear if llama.cpp cannot)."""
        if n >= len(self.tokens):
            return
        if n > 0 and C.llama_memory_seq_rm(self.memory, 0, n, -1):
            del self.tokens[n:]
        else:
            self.clear()

    def _decode(self, tokens: list[int], want_logits: bool, all_logits: bool = False) -> None:
        """Decode one batch at the next positions: logits for its last token (``want_logits``)
        or for every token (``all_logits``)."""
        batch = self._batch
        start = len(self.tokens)
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = int(all_logits)
        if want_logits:
            batch.logits[len(tokens) - 1] = 1
        rc = C.llama_decode(self.ptr, batch)
        if rc != 0:
            # The failed ubatch may have left part of the batch in the cache: resynchronise.
            if not C.llama_memory_seq_rm(self.memory, 0, start, -1):
                self.clear()
            raise (ContextFull if rc == 1 else LlamaError)(
                f"llama_decode failed with code {rc}", rc=rc)
        self.tokens.extend(tokens)

    def eval_prompt(self, prompt: list[int], should_stop: Callable[[], bool]) -> int:
        """Put ``prompt`` in the KV cache, reusing the longest cached prefix; logits for its last
        token are ready afterwards. Returns the number of prompt tokens reused."""
        common = 0
        limit = min(len(prompt), len(self.tokens))
        while common < limit and prompt[common] == self.tokens[common]:
            common += 1
        reused = min(common, len(prompt) - 1)  # the last token is always evaluated for logits
        self._truncate(reused)
        reused = len(self.tokens)
        rest = prompt[reused:]
        for i in range(0, len(rest), self.n_batch):
            if should_stop():
                return reused
            chunk = rest[i : i + self.n_batch]
            self._decode(chunk, want_logits=i + self.n_batch >= len(rest))
        return reused

    def decode_token(self, token: int) -> None:
        self._decode([token], want_logits=True)

    def logits(self, i: int = -1) -> np.ndarray:
        ptr = C.llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def close(self) -> None:
        if self.ptr:
            C.llama_batch_free(self._batch)
            C.llama_free(self.ptr)
            self.ptr = None
            release_free_memory()


def top_logprobs(logits: np.ndarray, k: int, token: int | None = None
                 ) -> list[list[float]]:
    """The ``k`` most likely next tokens with their log-probabilities (raw model logits);
    with ``token``, that token's log-probability is appended as ``[token, logprob]`` (one
    pass over the vocabulary for both)."""
    logits = logits.astype(np.float64)  # only when a request asks for log-probabilities
    m = logits.max()
    logz = m + np.log(np.exp(logits - m).sum())
    top = np.argpartition(-logits, k - 1)[:k]
    top = top[np.argsort(-logits[top], kind="stable")]
    out = [[int(t), float(logits[t] - logz)] for t in top]
    if token is not None:
        out.append([int(token), float(logits[token] - logz)])
    return out


class Sequence:
    """One sequence of a :class:`Slab`: a lorad context's share of a batched llama_context.

    ``tokens`` mirrors what its cells hold and ``keys`` the adapter stack each was computed
    under (one :func:`stack_key` per token: an activated LoRA changes the stack mid-prompt).
    Its methods call llama.cpp: only the slab's decode thread calls them.
    """

    def __init__(self, slab: Slab, seq_id: int, n_ctx: int) -> None:
        self.slab = slab
        self.seq_id = seq_id
        self.n_ctx = n_ctx
        self.tokens: list[int] = []
        self.keys: list[tuple[tuple[int, float], ...]] = []

    @property
    def stack_key(self) -> tuple[tuple[int, float], ...]:
        """The stack of the last cached token (``()`` when nothing is cached)."""
        return self.keys[-1] if self.keys else ()

    def _cut(self, n: int) -> None:
        del self.tokens[n:]
        del self.keys[n:]

    def keep(self, n: int) -> None:
        """Keep the first ``n`` cached tokens (clears all when llama.cpp cannot cut there)."""
        if n >= len(self.tokens):
            return
        mem = self.slab.memory
        if n > 0 and C.llama_memory_seq_rm(mem, self.seq_id, n, -1):
            self._cut(n)
        else:
            C.llama_memory_seq_rm(mem, self.seq_id, -1, -1)
            self._cut(0)

    def rollback(self, n: int) -> None:
        """Drop every cached token after the first ``n`` (rejected draft tokens)."""
        if n < len(self.tokens):
            if not C.llama_memory_seq_rm(self.slab.memory, self.seq_id, n, -1):
                raise NoRollback("this model's memory cannot roll back rejected tokens",
                                 reason="no_rollback")
            self._cut(n)


class Slab:
    """A llama_context that holds up to ``n_seq`` sequences and decodes them in one batch.

    Each sequence has ``n_ctx_seq`` cells of its own (``kv_unified`` false: a token attends
    to its sequence's cells only), or, unified, every sequence draws from one pool of
    ``n_seq * n_ctx_seq`` cells. The adapter stack applies to a whole batch, so a batch holds
    sequences of one stack (the scheduler's rule); switching costs llama.cpp a graph reserve.
    """

    def __init__(self, model: Model, *, n_seq: int, n_ctx_seq: int, n_batch: int,
                 n_threads: int, kv_type: str = "f16", flash_attn: bool | None = None,
                 unified: bool = False) -> None:
        params = C.llama_context_default_params()
        params.kv_unified = unified
        self.unified = unified
        self.ptr = _new_context(model, params, n_ctx=n_ctx_seq * n_seq, n_seq=n_seq,
                                n_batch=n_batch, n_threads=n_threads, kv_type=kv_type,
                                flash_attn=flash_attn)
        self.model = model
        self.n_seq = n_seq
        self.n_threads = n_threads
        self.n_ctx_seq = int(C.llama_n_ctx_seq(self.ptr))
        self.n_batch = n_batch
        self.memory = C.llama_get_memory(self.ptr)
        self._batch = C.llama_batch_init(n_batch, 0, 1)
        self._adapters: tuple[tuple[int, float], ...] = ()

    def set_adapters(self, stack: list[tuple[Adapter, float]],
                     key: tuple[tuple[int, float], ...]) -> None:
        """Make ``stack`` (whose :func:`stack_key` is ``key``) the adapters of the next batch."""
        if key == self._adapters:
            return
        _set_adapters(self.ptr, stack)
        self._adapters = key

    def decode(self, entries: list[tuple[Sequence, list[int], int]],
               fillers: list[tuple[int, int, bool]] = ()) -> list[int]:
        """Decode, in one batch, ``tokens`` at the next positions of each sequence (under the
        adapters of :meth:`set_adapters`); ``outputs`` is how many of an entry's last tokens
        get logits. Returns each entry's batch index of its first token (for :meth:`logits`).

        ``fillers``: ``(seq_id, pos, logits)`` of sequences not stepped whose ids lie between
        those of the entries, each given one token at ``pos`` (its next position) whose cell is
        removed after the decode, with an output row only where ``logits`` (which are never
        read): with a KV pool per sequence, llama.cpp computes a ubatch of one token per
        sequence at once only for consecutive sequence ids, and a gap (a context between
        requests) split every step in two."""
        batch = self._batch
        filler = self.model.bos if self.model.bos >= 0 else 0
        rows = [(seq.seq_id, len(seq.tokens), tokens, outputs, k)
                for k, (seq, tokens, outputs) in enumerate(entries)]
        if fillers:  # in the batch at their ids' places (the entries are in that order)
            rows = sorted([*rows, *((sid, pos, [filler], int(out), -1)
                                    for sid, pos, out in fillers)],
                          key=lambda e: e[0])
        if sum(len(e[2]) for e in rows) > self.n_batch:
            raise ValueError("more tokens than n_batch in one batch")
        i = 0
        starts = [0] * len(entries)
        for seq_id, pos0, tokens, outputs, k in rows:
            if k >= 0:
                starts[k] = i
            first_out = len(tokens) - outputs
            for j, tok in enumerate(tokens):
                batch.token[i] = tok
                batch.pos[i] = pos0 + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = int(j >= first_out)
                i += 1
        batch.n_tokens = i
        rc = C.llama_decode(self.ptr, batch)
        for seq_id, pos, _ in fillers:  # their cells go: the sequences are as they were
            C.llama_memory_seq_rm(self.memory, seq_id, pos, -1)
        if rc != 0:
            # A failed ubatch may have left part of the batch in the cache: resynchronise.
            for seq, _, _ in entries:
                if not C.llama_memory_seq_rm(self.memory, seq.seq_id, len(seq.tokens), -1):
                    C.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
                    seq._cut(0)
            raise (ContextFull if rc == 1 else LlamaError)(
                f"llama_decode failed with code {rc}", rc=rc)
        for seq, tokens, _ in entries:
            seq.tokens.extend(tokens)
            seq.keys.extend([self._adapters] * len(tokens))
        return starts

    def logits(self, i: int) -> np.ndarray:
        """The logits after batch token ``i`` (a view: valid until the next decode)."""
        ptr = C.llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def clear_seq(self, seq: Sequence) -> None:
        C.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
        seq._cut(0)

    def _seq_state(self, seq_id: int, flags: int) -> bytes:
        n = C.llama_state_seq_get_size_ext(self.ptr, seq_id, flags)
        buf = (ctypes.c_uint8 * n)()
        written = C.llama_state_seq_get_data_ext(self.ptr, buf, n, seq_id, flags)
        return bytes(buf)[:written]

    def exchange(self, a: int, b: int, a_cells: bool, b_cells: bool) -> tuple[bool, bool]:
        """Exchange the cells of sequence ids ``a`` and ``b`` of this slab (llama.cpp's
        sequence state, nothing evaluated again; ``*_cells``: whether that id holds any).
        Reads back, per side, whether its cells arrived at the other id (False: that id is
        left empty; the caller's :class:`Sequence` must drop its tokens)."""
        states = [self._seq_state(i, 0) if has else None for i, has in ((a, a_cells),
                                                                         (b, b_cells))]
        for i in (a, b):
            C.llama_memory_seq_rm(self.memory, i, -1, -1)
        return (states[0] is None or self._restore(states[0], b),
                states[1] is None or self._restore(states[1], a))

    def _restore(self, state: bytes | None, seq_id: int) -> bool:
        """Set a sequence's state (as :meth:`_seq_state` reads it) into ``seq_id`` of this
        slab; whether it arrived (if not, ``seq_id`` is left empty)."""
        if state and C.llama_state_seq_set_data_ext(
                self.ptr, (ctypes.c_uint8 * len(state)).from_buffer_copy(state), len(state),
                seq_id, 0):
            return True
        C.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
        return False

    def move_to(self, other: Slab, sequences: list[Sequence]) -> None:
        """Copy each sequence's cells into the same sequence id of ``other`` (llama.cpp's
        sequence state, without evaluating anything again) and make them ``other``'s. A
        sequence whose state ``other`` refuses starts empty there (its next prompt is
        evaluated whole: correct, only slower)."""
        for seq in sequences:
            if seq.tokens and not other._restore(self._moved_state(seq.seq_id, other.n_seq),
                                                 seq.seq_id):
                seq._cut(0)
            seq.slab = other

    def _moved_state(self, seq_id: int, n_seq: int) -> bytes | None:
        """The sequence's state as a slab of ``n_seq`` sequences reads it, or None.

        With a KV pool per sequence (not unified), llama.cpp writes a cache's sequence state as
        its number of streams (one per sequence) then, per stream, a cell count (0 for every
        stream but the sequence's own) and that stream's cells; it reads it back only into a
        cache of as many streams. So each cache's part is re-headed for ``n_seq`` streams. A
        model with sliding-window layers has two caches: the state of the second alone is
        what ``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`` gives, which splits the two. Both come
        after an 8-byte header (a magic number and the sequence id)."""
        state = self._seq_state(seq_id, 0)
        if self.unified or len(state) < 12:
            return state or None
        head, full = state[:8], state[8:]
        tail = self._seq_state(seq_id, C.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)[8:]
        if not tail or len(tail) > len(full) or not full.endswith(tail):
            return None
        parts = [full] if len(tail) == len(full) else [full[:len(full) - len(tail)], tail]
        out = []
        zero = struct.pack("<I", 0)
        for part in parts:
            (n_old,) = struct.unpack_from("<I", part)
            after = n_old - 1 - seq_id
            own = part[4 + 4 * seq_id:len(part) - 4 * after]
            if (n_old != self.n_seq or part[4:4 + 4 * seq_id] != zero * seq_id
                    or part[len(part) - 4 * after:] != zero * after):
                return None  # not the layout described above
            out += [struct.pack("<I", n_seq), zero * seq_id, own, zero * (n_seq - 1 - seq_id)]
        return head + b"".join(out)

    def close(self) -> None:
        if self.ptr:
            C.llama_batch_free(self._batch)
            C.llama_free(self.ptr)
            self.ptr = None
            release_free_memory()


def stack_key(stack: list[tuple[Adapter, float]]) -> tuple[tuple[int, float], ...]:
    """What identifies an adapter stack for llama.cpp: the adapters' C addresses (as llama.cpp
    compares them; a Python id could be reused by a new object while llama.cpp still holds
    the old pointer) and float32 scales."""
    return tuple((ctypes.cast(a.ptr, ctypes.c_void_p).value or 0, float(np.float32(s)))
                 for a, s in stack)


def padded_n_ctx(n_ctx: int) -> int:
    """The context size llama.cpp gives a sequence asked for ``n_ctx`` (a multiple of 256)."""
    return max(256, (n_ctx + 255) // 256 * 256)


POOLING_NAMES = {C.LLAMA_POOLING_TYPE_MEAN: "mean", C.LLAMA_POOLING_TYPE_CLS: "cls",
                 C.LLAMA_POOLING_TYPE_LAST: "last"}


# -- sampling ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0
    grammar: str | None = None


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _grammar_too_slow(what: str, ms: float, limit_ms: int) -> BadGrammar:
    return BadGrammar(
        f"grammar too costly: {what} took {ms:.0f} ms, over limits.grammar_ms ({limit_ms})",
        field="grammar", limit="grammar_ms", value=limit_ms, found=round(ms),
    )


class _TokenArray:
    """A ``llama_token_data_array`` over numpy memory, refilled from logits for each step."""

    def __init__(self, n: int) -> None:
        self.ids = np.arange(n, dtype=np.int32)
        self.data = np.zeros(n, dtype=_TOKEN_DATA)
        self.c = C.llama_token_data_array(data=self.data.ctypes.data_as(C.llama_token_data_p),
                                          size=n, selected=-1, sorted=False)

    def fill(self, logits: np.ndarray, ids: np.ndarray | None = None) -> None:
        self.data["id"] = self.ids if ids is None else ids  # samplers sort and cut in place
        self.data["logit"] = logits
        self.data["p"] = 0.0
        self.c.data = self.data.ctypes.data_as(C.llama_token_data_p)
        self.c.size, self.c.selected, self.c.sorted = len(self.data), -1, False

    def apply(self, sampler: Any) -> None:
        C.llama_sampler_apply(sampler, ctypes.byref(self.c))

    def chosen(self) -> tuple[int, float] | None:
        """The selected token and its logit (None if nothing was selected)."""
        if not 0 <= self.c.selected < self.c.size:
            return None
        entry = self.c.data[self.c.selected]
        return int(entry.id), float(entry.logit)


class Sampler:
    """A llama_sampler chain for one request. Temperature 0 is greedy (argmax).

    A grammar is a sampler of its own, driven here step by step: llama.cpp aborts the process
    when a grammar is made to accept a token it rejects, which ``llama_sampler_sample`` does
    once a grammar allows no token at all, so each step checks that the grammar left a token
    before accepting it. Greedy decoding first asks the grammar about the argmax alone and
    masks the whole vocabulary only when it is rejected (exact: an allowed argmax is the
    argmax of the masked logits; 40-70 ms per token saved on a 262k vocabulary). Building the
    grammar and each step are timed against ``time_limit_ms``.
    """

    def __init__(self, model: Model, p: SamplingParams, time_limit_ms: int = 1000) -> None:
        self.ptr = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        self.grammar: Any = None
        self.time_limit_ms = time_limit_ms
        self._greedy = p.temperature == 0
        add = lambda s: C.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
        if p.grammar is not None:
            started = time.perf_counter()
            with capture_log() as lines:
                self.grammar = C.llama_sampler_init_grammar(model.vocab, p.grammar.encode(),
                                                            b"root")
            ms = (time.perf_counter() - started) * 1000
            if not self.grammar:
                self.grammar = None
                self.close()
                raise BadGrammar("invalid GBNF grammar", field="grammar", log=_relevant(lines))
            if ms > time_limit_ms:
                self.close()
                raise _grammar_too_slow("building the grammar", ms, time_limit_ms)
            self._all = _TokenArray(model.n_vocab)
            self._one = _TokenArray(1)
        if p.repeat_penalty != 1.0 and p.repeat_last_n > 0:
            add(C.llama_sampler_init_penalties(model.n_vocab, p.repeat_last_n,
                                               p.repeat_penalty, 0.0, 0.0))
        if p.temperature == 0:
            add(C.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(C.llama_sampler_init_top_k(p.top_k))
            add(C.llama_sampler_init_top_p(p.top_p, 1))
            add(C.llama_sampler_init_min_p(p.min_p, 1))
            add(C.llama_sampler_init_temp(p.temperature))
            add(C.llama_sampler_init_dist(p.seed))

    def sample(self, ctx: Context | Slab, i: int = -1) -> int:
        """Sample (and accept) the next token from the logits after batch token ``i``."""
        if self.grammar is None:
            return int(C.llama_sampler_sample(self.ptr, ctx.ptr, i))
        started = time.perf_counter()
        logits = ctx.logits(i)
        token = self._greedy_within_grammar(logits) if self._greedy else None
        if token is None:
            self._all.fill(logits)
            self._all.apply(self.grammar)
            self._all.apply(self.ptr)
            chosen = self._all.chosen()
            if chosen is None or not np.isfinite(chosen[1]):
                raise BadGrammar(
                    "the grammar allows no token of this model's vocabulary here (the output "
                    "so far cannot be continued within it)", field="grammar")
            token = chosen[0]
        C.llama_sampler_accept(self.grammar, token)
        C.llama_sampler_accept(self.ptr, token)
        ms = (time.perf_counter() - started) * 1000
        if ms > self.time_limit_ms:
            raise _grammar_too_slow("one token", ms, self.time_limit_ms)
        return token

    def _greedy_within_grammar(self, logits: np.ndarray) -> int | None:
        """The chain's greedy choice if the grammar allows it, else None."""
        self._all.fill(logits)
        self._all.apply(self.ptr)
        chosen = self._all.chosen()
        if chosen is None:
            return None
        token, logit = chosen
        self._one.fill(np.array([logit], dtype=np.float32), np.array([token], dtype=np.int32))
        self._one.apply(self.grammar)  # sets the logit to -inf when the grammar rejects it
        return token if np.isfinite(self._one.data["logit"][0]) else None

    def close(self) -> None:
        if self.grammar:
            C.llama_sampler_free(self.grammar)
            self.grammar = None
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None
