"""Bounds on what one peer may send; the same numbers guard both sides of the wire."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Size limits applied while decoding untrusted bytes and validating arguments."""

    max_message_bytes: int = 16 * 1024 * 1024
    max_str_len: int = 4 * 1024 * 1024
    max_bin_len: int = 4 * 1024 * 1024
    max_array_len: int = 131072
    """Elements of one array: a prompt of `max_n_ctx` tokens fits; decoding stays within a few
    milliseconds of the event loop."""
    max_map_len: int = 1024
    max_depth: int = 32
    max_tokens: int = 32768
    """Ceiling for a request's ``max_tokens``."""
    max_logprobs: int = 20
    max_stop_sequences: int = 16
    max_credit: int = 4096
    """Largest number of stream items a client may grant at once."""
    max_loras: int = 16
    """Most adapters in one stack."""
    max_contexts: int = 64
    """Contexts in the whole daemon."""
    max_contexts_per_client: int = 16
    """Contexts one client connection may create."""
    max_n_ctx: int = 131072
    """Largest ``n_ctx`` of a context."""
    max_streams_per_client: int = 32
    """Concurrent (queued or running) generate/chat streams of one client connection."""
    max_adapter_bytes: int = 4 * 1024**3
    """Total memory of the loaded LoRA adapters (their tensors), all models together."""
    max_grammar_bytes: int = 64 * 1024
    """Largest GBNF grammar (UTF-8 bytes)."""
    max_grammar_depth: int = 64
    """Deepest nesting of parenthesised groups in a grammar."""
    max_grammar_rules: int = 1024
    """Rules of a grammar, counting those llama.cpp makes for groups and repetitions."""
    max_grammar_alternatives: int = 512
    """Alternatives (``|``) in a grammar, all rules together."""
    grammar_ms: int = 1000
    """Longest time llama.cpp may spend building a request's grammar sampler or applying it
    to one token; a request that takes longer ends with ``bad_request``."""
    template_timeout_ms: int = 1000
    """Longest time a chat template may take to render."""
    max_template_output: int = 1024 * 1024
    """Most characters a chat template may render."""
    template_memory_bytes: int = 1024**3
    """Address-space limit of the process that renders chat templates."""
    template_workers: int = 2
    """Chat templates rendered at once (each in its own worker process)."""
    max_embed_inputs: int = 64
    """Most inputs of one ``embed`` request."""
    memory_budget_bytes: int = 0
    """Memory the daemon may commit to model weights and KV caches together; a model load, a
    context or a slab growth past it is refused with ``too_large`` and the figures. 0: derived
    from the machine's physical memory when the daemon starts (see ``capabilities()["memory"]``)."""
    max_n_threads: int = 0
    """Largest ``n_threads`` of a context. 0: the number of CPUs the daemon may run on."""
    file_workers: int = 2
    """Threads for slow file work (reading, parsing and converting adapter files); decoding and
    everything else never waits for them."""
    max_file_ops_per_client: int = 2
    """Slow file operations (adapter validations, loads and conversions) one client connection
    may have under way at once; past it a request gets ``too_large``."""
    text_workers: int = 2
    """Threads for tokenizing and detokenizing (requests' and prompts')."""
    max_text_ops_per_client: int = 4
    """``tokenize``/``detokenize`` calls one client connection may have under way at once;
    past it a request gets ``too_large``."""
    max_adapter_file_bytes: int = 2 * 1024**3
    """Largest adapter file (or PEFT weights file) the daemon reads; it reads a private snapshot
    of the file, never a memory map of it."""


DEFAULT_LIMITS = Limits()
