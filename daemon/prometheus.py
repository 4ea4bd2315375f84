"""An optional Prometheus exporter (``lorad serve --metrics-address 127.0.0.1:PORT``).

It serves ``/metrics`` from prometheus-client's own HTTP thread with a collector that reads the
daemon's counters (:class:`lorad.daemon.metrics.Metrics`) at scrape time.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lorad.protocol import ErrorCode, ProtocolError

COUNTERS = {
    "requests": "Requests finished",
    "streams": "generate/chat streams finished",
    "prompt_tokens": "Prompt tokens of finished streams",
    "generated_tokens": "Tokens generated",
    "cancelled": "Requests cancelled",
    "adapter_loads": "LoRA adapters loaded",
    "stack_changes": "LoRA stack changes",
    "drafted_tokens": "Speculative draft tokens proposed",
    "accepted_tokens": "Speculative draft tokens accepted",
}


class _Collector:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        for _ in range(3):  # the trio thread may change a dict while we copy it
            try:
                snap = self._snapshot()
                break
            except RuntimeError:
                continue
        else:
            return
        scopes = [("daemon", "", snap["total"])]
        scopes += [("model", k, v) for k, v in snap["models"].items()]
        scopes += [("context", k, v) for k, v in snap["contexts"].items()]
        for name, doc in COUNTERS.items():
            family = CounterMetricFamily(f"lorad_{name}", doc, labels=["scope", "id"])
            for scope, key, stats in scopes:
                family.add_metric([scope, key], stats[name])
            yield family
        errors = CounterMetricFamily("lorad_errors", "Requests failed, by error code",
                                     labels=["scope", "id", "code"])
        for scope, key, stats in scopes:
            for code, n in stats["errors"].items():
                errors.add_metric([scope, key, code], n)
        yield errors
        by_door = CounterMetricFamily("lorad_transport_requests", "Requests finished, by door "
                                      "(zmq: the protocol; http: the OpenAI-compatible API)",
                                      labels=["transport"])
        door_errors = CounterMetricFamily("lorad_transport_errors", "Requests failed, by door "
                                          "and error code", labels=["transport", "code"])
        for transport, stats in snap.get("transports", {}).items():
            by_door.add_metric([transport], stats["requests"])
            for code, n in stats["errors"].items():
                door_errors.add_metric([transport, code], n)
        yield by_door
        yield door_errors
        for what, field in (("time_to_first_token_ms", "ttft"), ("request_ms", "request")):
            gauge = GaugeMetricFamily(f"lorad_{field}_ms", f"{what} over the last requests",
                                      labels=["scope", "id", "quantile"])
            for scope, key, stats in scopes:
                for q in ("p50", "p90", "p99"):
                    if stats[what][q] is not None:
                        gauge.add_metric([scope, key, q], stats[what][q])
            yield gauge
        yield GaugeMetricFamily("lorad_uptime_seconds", "Daemon uptime", value=snap["uptime_s"])


CONTENT_TYPE = CONTENT_TYPE_LATEST


def render(snapshot: Callable[[], dict[str, Any]]) -> bytes:
    """The metrics in Prometheus' text format (the HTTP door's ``/metrics``)."""
    registry = CollectorRegistry()
    registry.register(_Collector(snapshot))
    return generate_latest(registry)


def start_exporter(address: str, snapshot: Callable[[], dict[str, Any]]) -> tuple[str, int]:
    """Serve ``/metrics`` on ``HOST:PORT`` (loopback only; port 0 picks one); returns it."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or not port.isdigit():
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"--metrics-address {address!r}: give a "
                            "loopback HOST:PORT such as 127.0.0.1:9464", field="metrics_address")
    registry = CollectorRegistry()
    registry.register(_Collector(snapshot))
    server, _thread = start_http_server(int(port), addr=host, registry=registry)
    return host, server.server_address[1]
