"""GPU offload: what this build of llama.cpp can offload to, how many layers a model gets, and
whether they fit the devices' memory.

llama-cpp-python is built for the CPU unless asked otherwise (``make serve GPU=cuda``, README
"GPUs"). On a build with a GPU backend, models load with every layer on the GPU unless
``n_gpu_layers`` says otherwise (in the config file, on ``load_model`` or ``lorad serve
--n-gpu-layers``), as llama-server and Ollama do. On a CPU build llama.cpp would silently keep
an offload request on the CPU: here it is refused (``bad_request`` naming ``n_gpu_layers`` and
the reason ``no_gpu_backend``), never ignored.

The devices come from ggml's backend registry (``libggml``, next to ``libllama``), through
ctypes: llama-cpp-python does not bind that part of the API.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from lorad.protocol import ErrorCode, ProtocolError

ALL_LAYERS = -1
"""``n_gpu_layers`` for every layer (llama.cpp counts the output layer as one more)."""

_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
"""``enum ggml_backend_dev_type``."""


@dataclass(frozen=True)
class Device:
    """One ggml backend device (the CPU is one too)."""

    name: str
    description: str
    type: str
    free_bytes: int
    total_bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "type": self.type,
                "free_bytes": self.free_bytes, "total_bytes": self.total_bytes}


def _libggml() -> ctypes.CDLL:
    import llama_cpp

    base = os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(llama_cpp.__file__).parent / "lib")
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        path = Path(base) / name
        if path.exists():
            return ctypes.CDLL(str(path))
    return ctypes.CDLL("libggml.so")


@cache
def _api() -> Any:
    lib = _libggml()
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
        fn.argtypes = [ctypes.c_void_p]
        fn.restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_memory.restype = None
    return lib


def devices() -> list[Device]:
    """Every device of ggml's registry, with its memory now (after ``llama.init_backend``)."""
    lib = _api()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Device((lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                          (lib.ggml_backend_dev_description(dev) or b"").decode(
                              errors="replace"),
                          _TYPES.get(lib.ggml_backend_dev_type(dev), "other"),
                          free.value, total.value))
    return out


def offload_devices(all_devices: list[Device]) -> list[Device]:
    """The devices layers can be offloaded to (GPUs, integrated ones included)."""
    return [d for d in all_devices if d.type in ("gpu", "igpu")]


def default_layers(supported: bool) -> int:
    """``n_gpu_layers`` when none is given: every layer on a GPU build, none on a CPU one."""
    return ALL_LAYERS if supported else 0


def resolve_layers(requested: int | None, supported: bool) -> int:
    """The ``n_gpu_layers`` a model loads with; a request to offload on a build that cannot is
    ``bad_request`` (reason ``no_gpu_backend``), never silently run on the CPU."""
    if requested is None:
        return default_layers(supported)
    if requested != 0 and not supported:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"n_gpu_layers = {requested} asks for GPU offload, but this llama.cpp build has no "
            "GPU backend: rebuild with `make serve GPU=cuda` (README \"GPUs\") or give "
            "n_gpu_layers = 0", field="n_gpu_layers", reason="no_gpu_backend")
    return requested


def offloaded(requested: int, n_layer: int) -> int:
    """How many of a model's ``n_layer`` repeating layers (plus its output layer, counted as
    one more by llama.cpp) ``requested`` puts on the GPU."""
    if requested < 0:
        return n_layer + 1
    return min(requested, n_layer + 1)


def check_fit(weights_bytes: int, n_layer: int, layers: int, free_bytes: int,
              in_use_bytes: int = 0) -> None:
    """Refuse (``too_large`` with the figures) a load whose offloaded share of the weights
    would not fit the GPUs' free memory. The share is the weights times ``layers`` over
    ``n_layer + 1`` (layers are about the same size); the KV caches and compute buffers of
    its contexts come on top, so a model that fills the GPU leaves none for its contexts:
    give fewer ``n_gpu_layers`` to split it (the rest stays on the CPU)."""
    if layers <= 0:
        return
    needed = weights_bytes * min(layers, n_layer + 1) // (n_layer + 1)
    if needed > free_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"{layers} offloaded layers need {needed} bytes of GPU memory, {free_bytes} are "
            "free: give fewer n_gpu_layers (the rest runs on the CPU), or unload a model",
            needed=needed, budget=free_bytes, in_use=in_use_bytes, field="n_gpu_layers")
