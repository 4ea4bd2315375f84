"""The daemon process's imports, kept to what it uses (its memory is counted against its
contexts': issue 25's 1.3x of weights + KV caches).

Three packages pull in more than the daemon needs when imported as they are:

- ``llama_cpp``'s ``__init__`` imports its high-level API (``llama_cpp.llama``: jinja2, diskcache,
  sqlite3), which the daemon never calls; it uses the ctypes bindings (``llama_cpp.llama_cpp``).
- structlog's console renderer imports ``rich`` (and with it pygments) when it is installed,
  for coloured tracebacks; ``rich`` is installed for the ``lorad`` command's progress bars.
- ``gguf``'s ``__init__`` imports the whole package (its reader, writer, vocabulary and model
  card modules: yaml among them), where the daemon's header checks need its constants only;
  its writer is used when a PEFT adapter is converted.

Measured in a fresh interpreter importing the daemon's server module: PSS 63.0 MiB as they are,
52.8 MiB lean (54.6 before ``gguf`` was made lean too).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.abc import Loader

__all__ = ["keep_imports_lean"]


def keep_imports_lean() -> None:
    """Call first in a process that will run the daemon, before its modules are imported.

    ``llama_cpp`` is then the bindings' names plus ``__version__``; any other name of the package
    (``llama_cpp.Llama``, ...) still resolves, by importing the high-level API on first use.
    ``rich`` is not importable in the process: console logs print tracebacks plainly. ``gguf``
    is its constants; its other names (``gguf.GGUFWriter``, ...) import the whole package on
    first use. A package already imported is left as it is."""
    if "rich" not in sys.modules:
        sys.modules["rich"] = None  # type: ignore[assignment]  # import rich -> ImportError
    if "llama_cpp" not in sys.modules:
        _bindings_only_llama_cpp()
    if "gguf" not in sys.modules:
        _constants_only_gguf()


def _bare_package(name: str, first: str) -> tuple[ModuleType, Loader] | None:
    """Package ``name`` in ``sys.modules`` with its ``__init__`` not run, holding the public
    names of its module ``first`` (as the package's own ``from .first import *``), and the
    loader that runs that ``__init__``; None where it is not installed (the daemon's own
    import then says so)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return None
    package = importlib.util.module_from_spec(spec)  # __path__ and __spec__, __init__ not run
    sys.modules[name] = package
    try:
        module = importlib.import_module(f"{name}.{first}")
    except BaseException:
        del sys.modules[name]
        raise
    package.__dict__.update((k, v) for k, v in vars(module).items() if not k.startswith("_"))
    return package, spec.loader


def _bindings_only_llama_cpp() -> None:
    bare = _bare_package("llama_cpp", "llama_cpp")
    if bare is None:
        return
    package = bare[0]
    package.__version__ = _version(package)  # type: ignore[attr-defined]

    def __getattr__(name: str) -> Any:  # PEP 562: the rest of the package, on first use
        high_level = importlib.import_module("llama_cpp.llama")
        try:
            return getattr(high_level, name)
        except AttributeError:
            raise AttributeError(f"module 'llama_cpp' has no attribute {name!r}") from None

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]


def _constants_only_gguf() -> None:
    bare = _bare_package("gguf", "constants")
    if bare is None:
        return
    (package, loader), state, lock = bare, {"init": "not run"}, threading.RLock()

    def __getattr__(name: str) -> Any:  # PEP 562: the whole package, on first use of another name
        # as an import's module lock: another thread waits for the __init__ (PEFT conversions
        # run on two file threads); the thread running it sees what is there so far
        with lock:
            if state["init"] == "not run":
                state["init"] = "running"
                try:
                    loader.exec_module(package)  # its __init__, in this module's namespace
                    state["init"] = "run"
                except BaseException:
                    state["init"] = "not run"  # the next use tries again
                    raise
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'gguf' has no attribute {name!r}") from None

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]


def _version(package: Any) -> str:
    """The package's own ``__version__`` (set in the ``__init__`` not run), else its
    distribution's."""
    init = getattr(package, "__file__", None)
    if init:
        try:
            with open(init, encoding="utf-8") as f:
                found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", f.read(), re.M)
        except OSError:
            found = None
        if found:
            return found.group(1)
    import importlib.metadata  # only here: it imports email's modules

    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
