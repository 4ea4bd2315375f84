"""The client needs only pyzmq and msgpack; its exceptions mirror the protocol's error codes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from lorad.client import errors as client_errors
from lorad.client.errors import ERRORS_BY_CODE, LoradError, error_from_wire
from lorad.protocol import ErrorCode

# Runs in a fresh interpreter: block the daemon-only packages before anything imports them.
BLOCKED_CLIENT_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys
    import time

    BLOCKED = {"llama_cpp", "trio", "gguf", "numpy", "structlog", "jinja2", "rich",
               "prometheus_client"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked for this test")
            return None

    for name in list(sys.modules):
        assert name.split(".")[0] not in BLOCKED, f"{name} was imported at startup"
    sys.meta_path.insert(0, Blocker())

    import lorad.client
    import lorad.protocol
    from lorad.client import Client, DaemonUnavailable

    client = Client("ipc:///nonexistent/x.sock", connect_timeout=0.2)
    started = time.monotonic()
    try:
        client.ping()
    except DaemonUnavailable as exc:
        elapsed = time.monotonic() - started
        assert exc.details == {"endpoint": "ipc:///nonexistent/x.sock"}, exc.details
    else:
        raise AssertionError("ping() answered without a daemon")
    finally:
        client.close()
    assert elapsed < 2.0, elapsed

    try:
        lorad.client.AsyncClient
    except ImportError:
        pass
    else:
        raise AssertionError("AsyncClient imported without trio")

    loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    assert not any(n.startswith("lorad.daemon") for n in sys.modules)
    print(f"OK {elapsed:.3f}")
    """
)


def test_client_imports_and_fails_fast_without_daemon_dependencies() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_CLIENT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK ")


def test_every_error_code_has_its_own_exception() -> None:
    codes = [code.value for code in ErrorCode]
    assert set(ERRORS_BY_CODE) == set(codes)
    classes = [ERRORS_BY_CODE[code] for code in codes]
    assert len(set(classes)) == len(classes)
    for code, cls in zip(codes, classes, strict=True):
        assert cls.code == code
        assert issubclass(cls, LoradError)
        assert cls is not LoradError
        assert getattr(client_errors, cls.__name__) is cls


def test_client_only_errors_are_not_protocol_codes() -> None:
    from lorad.client import DaemonUnavailable, RequestTimeout

    for cls in (DaemonUnavailable, RequestTimeout):
        assert issubclass(cls, LoradError)
        assert cls.code not in ERRORS_BY_CODE


def test_error_from_wire_keeps_code_message_and_details() -> None:
    for code in ErrorCode:
        details = {"field": "max_tokens", "nested": {"a": [1, 2]}}
        exc = error_from_wire({"code": code.value, "message": "boom", "details": details})
        assert type(exc) is ERRORS_BY_CODE[code.value]
        assert exc.code == code.value
        assert exc.message == "boom"
        assert exc.details == details
        assert str(exc) == f"[{code.value}] boom"


def test_error_from_wire_tolerates_missing_and_unknown_fields() -> None:
    exc = error_from_wire({"code": "context_busy"})
    assert exc.code == "context_busy" and exc.details == {}
    newer = error_from_wire({"code": "from_the_future", "message": "m", "details": {"x": 1}})
    assert isinstance(newer, ERRORS_BY_CODE["internal"])
    assert newer.code == "from_the_future"
    assert newer.details == {"x": 1}
