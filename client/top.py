"""``lorad top``: a live terminal view of the daemon's contexts (needs ``rich``)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .sync import Client


def _stack(stack: list[dict[str, Any]]) -> str:
    return ", ".join(f"{e['ref'].rsplit('/', 1)[-1]}:{e['scale']:g}" for e in stack) or "-"


def render(status: dict[str, Any], metrics: dict[str, Any],
           previous: dict[str, Any] | None, seconds: float) -> Group:
    """One frame: a header line and the table of contexts (tokens/s since the last frame)."""
    total = metrics["total"]
    head = Text(
        f"lorad {status['version']}  pid {status['pid']}  up {status['uptime_s']:.0f} s  "
        f"clients {status['clients']}  models {len(status['models'])}  "
        f"contexts {status['contexts_total']}  adapters {len(status['adapters'])}  "
        f"requests {total['requests']}  tokens out {total['generated_tokens']}  "
        f"errors {sum(total['errors'].values())}"
    )
    table = Table(expand=True)
    for col in ("context", "model", "state", "queued", "running", "adapter stack", "requests",
                "tokens out", "tok/s", "TTFT p50 ms", "spec. acceptance"):
        table.add_column(col, no_wrap=col != "adapter stack")
    for ctx in status["contexts"]:
        m = metrics["contexts"].get(ctx["id"], {})
        out = m.get("generated_tokens", 0)
        before = (previous or {}).get("contexts", {}).get(ctx["id"], {}).get("generated_tokens")
        rate = (out - before) / seconds if before is not None and seconds > 0 else None
        acc = m.get("acceptance_rate")
        table.add_row(
            ctx["id"], ctx["model"], ctx["state"], str(ctx["queued"]),
            str(ctx["running"] if ctx["running"] is not None else "-"), _stack(ctx["loras"]),
            str(m.get("requests", 0)), str(out), "-" if rate is None else f"{rate:.1f}",
            str((m.get("time_to_first_token_ms") or {}).get("p50") or "-"),
            "-" if acc is None else f"{acc:.2f}",
        )
    return Group(head, table)


def run_top(client: Client, interval: float, once: bool, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:  # a pipe: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 200))
    previous, stamp = None, time.monotonic()
    if once:
        console.print(render(client.status(), client.metrics(), None, 0.0))
        return
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            status, metrics = client.status(), client.metrics()
            now = time.monotonic()
            live.update(render(status, metrics, previous, now - stamp), refresh=True)
            previous, stamp = metrics, now
            time.sleep(interval)  # the refresh period of a terminal view
