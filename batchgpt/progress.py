"""The live display on a terminal: rows done of total, failures, requests/min and
tokens/min against the limits, spend so far, ETA. Under cron (stderr not a TTY) it is
never used; the runner logs a one-line progress message every few seconds instead, with
the same ETA (:func:`eta_s`), which is why this module loads rich only when it draws."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.text import Text


def eta_s(finished: int, total: int, elapsed_s: float) -> float | None:
    """Seconds until every row is settled at the pace so far; 0 when all are, None
    before the first one (no pace yet)."""
    if finished >= total:
        return 0.0
    if finished <= 0 or elapsed_s <= 0:
        return None
    return (total - finished) * elapsed_s / finished


def format_eta(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:,.0f}s"


def _limit(value: float, limit: float | None) -> str:
    return f"{value:,.0f}" + (f"/{limit:,.0f}" if limit else "")


def render(figures: dict[str, Any]) -> Text:
    from rich.text import Text

    done, failed, total = figures["done"], figures["failed"], figures["total"]
    finished = done + failed
    width = 30
    filled = int(width * finished / total) if total else width
    bar = "█" * filled + "░" * (width - filled)
    eta = figures.get("eta_s", eta_s(finished, total, figures["elapsed_s"]))
    cost = figures["cost_usd"]
    text = Text()
    text.append(f"{bar} {finished:,}/{total:,}", style="bold")
    text.append(f"  failed {failed:,}", style="red" if failed else "dim")
    text.append(f"  in flight {figures['in_flight']}")
    text.append(f"  req/min {_limit(figures['rpm'], figures['limit_rpm'])}")
    text.append(f"  tok/min {_limit(figures['tpm'], figures['limit_tpm'])}")
    text.append(f"  spent ${cost:,.4f}" if cost is not None else "  spent ?")
    text.append(f"  ETA {format_eta(eta) if finished < total else '-'}")
    return text


class LiveProgress:
    """A context manager whose ``update`` the runner calls twice a second."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self._live = Live(Text(""), console=Console(stderr=True), refresh_per_second=4,
                          transient=False)

    def __enter__(self) -> LiveProgress:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, figures: dict[str, Any]) -> None:
        self._live.update(render(figures))
