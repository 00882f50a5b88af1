"""The live display on a terminal: rows done of total, failures, requests/min and
tokens/min against the limits, spend so far, ETA. Under cron (stderr not a TTY) it is
never used; the runner logs a one-line progress message every few seconds instead."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text


def _limit(value: float, limit: float | None) -> str:
    return f"{value:,.0f}" + (f"/{limit:,.0f}" if limit else "")


def render(figures: dict[str, Any]) -> Text:
    done, failed, total = figures["done"], figures["failed"], figures["total"]
    finished = done + failed
    width = 30
    filled = int(width * finished / total) if total else width
    bar = "█" * filled + "░" * (width - filled)
    rate = finished / figures["elapsed_s"] if figures["elapsed_s"] > 0 else 0
    eta = f"{(total - finished) / rate:,.0f}s" if rate > 0 and finished < total else "-"
    cost = figures["cost_usd"]
    text = Text()
    text.append(f"{bar} {finished:,}/{total:,}", style="bold")
    text.append(f"  failed {failed:,}", style="red" if failed else "dim")
    text.append(f"  in flight {figures['in_flight']}")
    text.append(f"  req/min {_limit(figures['rpm'], figures['limit_rpm'])}")
    text.append(f"  tok/min {_limit(figures['tpm'], figures['limit_tpm'])}")
    text.append(f"  spent ${cost:,.4f}" if cost is not None else "  spent ?")
    text.append(f"  ETA {eta}")
    return text


class LiveProgress:
    """A context manager whose ``update`` the runner calls twice a second."""

    def __init__(self) -> None:
        self._live = Live(Text(""), console=Console(stderr=True), refresh_per_second=4,
                          transient=False)

    def __enter__(self) -> LiveProgress:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, figures: dict[str, Any]) -> None:
        self._live.update(render(figures))
