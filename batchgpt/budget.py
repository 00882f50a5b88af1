"""``limits.max_cost_usd``: what the job may still spend, and whether the next row may go.

The cap is on the **job**, not on one run: "stopped by the budget, rerun with a higher cap
to continue" only means what it says if a rerun with the same cap sends nothing more. So
:class:`Budget` starts from what the job was already charged over all its runs (the
index's ``spend``, results later replaced included: they were paid for) and adds what
this run pays.

Rows are admitted **one at a time**, in input order, against what is left. A row that
holds a reservation is sent (and retried) whatever happens to the budget afterwards;
nothing is ever cancelled to make room. The old scheme stopped the whole run as soon as
*one* row did not fit next to the rows in flight, which cancelled rows already admitted:
with a cap below concurrency × one row's worst case, every run sent nothing at all.

Arithmetic is in :class:`~decimal.Decimal` (from each float's shortest spelling), so five
reservations of $0.001 fit exactly under a $0.005 cap instead of missing it by 1e-18.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from batchgpt.pricing import Price, Usage, cost_usd, resolve_price
from batchgpt.tokens import DEFAULT_OUTPUT_RESERVE


def _dec(value: float) -> Decimal:
    return Decimal(repr(float(value)))


class Verdict(str, enum.Enum):
    """What :meth:`Budget.admit` says about the next row."""

    ADMIT = "admit"  # it fits: send it (its worst case is now reserved)
    WAIT = "wait"  # it doesn't fit yet, but rows in flight will settle: ask again then
    REFUSE = "refuse"  # it doesn't fit and nothing is in flight: stop dispatching


@dataclass(eq=False, slots=True)
class Reservation:
    """The worst case of one admitted row, held until the row settles (exactly once)."""

    amount: Decimal
    settled: bool = False


class Budget:
    """Reservations, spend and what is left of a cap (``cap=None``: no cap, admit all).

    The algorithm::

        remaining = cap − spent − reserved
            spent    = what the job was charged before this run + what this run paid
            reserved = the worst cases of admitted rows not yet settled

        admit(worst):   worst ≤ remaining           → ADMIT, and reserve worst
                        worst > remaining, reserved → WAIT until a row settles
                        worst > remaining, nothing  → REFUSE: stop dispatching
        settle(r, c):   reserved −= r; spent += c   (a reply: what it really cost)
        release(r):     reserved −= r               (no reply: a failed row is not billed)
        abandon(r):     reserved −= r; spent += r; unanswered += r
                        (sent, then given up before its reply — a second signal, the
                        grace period over: it may have been billed, so it counts in full)

    WAIT is what makes a small cap work: the dispatcher holds the next row until a row in
    flight settles (its reservation, usually far above its real cost, comes back) and
    asks again, rather than giving up while something is still in flight. Only REFUSE
    stops, and by then nothing is in flight, so nothing admitted is ever given up.

    The worst case is an estimate (the prompt at about four characters a token, plus the
    row's output cap), and real costs replace it as replies come in. A reply that cost
    more than was reserved (a prompt that tokenizes denser than the estimate, a row with
    no ``max_tokens`` that wrote past :data:`~batchgpt.tokens.DEFAULT_OUTPUT_RESERVE`)
    can take ``spent`` past the cap by that difference; the next row is then refused.
    """

    def __init__(self, cap: float | None, spent_before: float = 0.0) -> None:
        self.cap: Decimal | None = None if cap is None else _dec(cap)
        self._before = _dec(spent_before)
        self._run = Decimal(0)
        self._reserved = Decimal(0)
        self._unanswered = Decimal(0)
        self.outstanding = 0  # reservations not yet settled

    # -- the figures ----------------------------------------------------------------------
    @property
    def spent_this_run(self) -> float:
        return float(self._run)

    @property
    def spent(self) -> float:
        """What the job was charged over all its runs, this one included."""
        return float(self._before + self._run)

    @property
    def reserved(self) -> float:
        return float(self._reserved)

    @property
    def unanswered(self) -> float:
        """Worst cases charged for requests sent and given up before their reply: spend
        that no result records (the index keeps it apart, for the next runs' cap)."""
        return float(self._unanswered)

    @property
    def remaining(self) -> float | None:
        """What may still be reserved (None: no cap). Negative when replies cost more
        than their reservations and the job went over."""
        if self.cap is None:
            return None
        return float(self.cap - self._before - self._run - self._reserved)

    # -- the algorithm --------------------------------------------------------------------
    def admit(self, worst: float) -> tuple[Verdict, Reservation | None]:
        """Admit a row whose worst case is ``worst`` USD, or say to wait or to stop."""
        amount = _dec(worst)
        if self.cap is not None and (
            self._before + self._run + self._reserved + amount > self.cap
        ):
            return (Verdict.WAIT if self.outstanding else Verdict.REFUSE), None
        self._reserved += amount
        self.outstanding += 1
        return Verdict.ADMIT, Reservation(amount)

    def settle(self, reservation: Reservation, cost: float | None) -> None:
        """The row got a reply that cost ``cost`` (None: unknown, charged at the worst
        case, so an unknown never loosens the cap)."""
        if self._close(reservation):
            self._run += reservation.amount if cost is None else _dec(cost)

    def release(self, reservation: Reservation) -> None:
        """The row ended without a reply (failed, or left for the next run)."""
        self._close(reservation)

    def abandon(self, reservation: Reservation) -> None:
        """The row's request was on the wire when the run gave it up: it may have been
        billed without a reply to show for it, so its worst case counts as spent."""
        if self._close(reservation):
            self._run += reservation.amount
            self._unanswered += reservation.amount

    def _close(self, reservation: Reservation) -> bool:
        if reservation.settled:
            return False
        reservation.settled = True
        self._reserved -= reservation.amount
        self.outstanding -= 1
        return True


def worst_case(model: str, prompt_tokens: int, output_cap: int | None,
               pricing: Mapping[str, Price]) -> float | None:
    """The most a row may cost: its prompt estimate plus its output cap (or
    DEFAULT_OUTPUT_RESERVE when it sets none) at its model's price; None when the price is
    unknown."""
    out = DEFAULT_OUTPUT_RESERVE if output_cap is None else output_cap
    return cost_usd(Usage(prompt_tokens=prompt_tokens, completion_tokens=out,
                          total_tokens=prompt_tokens + out), resolve_price(model, pricing))


def billed_model(served: str, requested: str, pricing: Mapping[str, Price]) -> str:
    """The model a reply is priced as: the one the server says answered (a dated snapshot
    of the requested family, or another model), unless that name has no price and the
    requested one has: a server or proxy answering with its own alias
    (``my-proxy/fast``) for ``gpt-4o-mini`` is priced as ``gpt-4o-mini``, not reported as
    "cost unknown" (which also let such replies spend past a cap)."""
    if served == requested or resolve_price(served, pricing) is not None:
        return served
    return requested if resolve_price(requested, pricing) is not None else served


def unpriced(models: Iterable[str], pricing: Mapping[str, Price]) -> list[str]:
    """Of ``models``, those with no price, sorted."""
    return sorted({m for m in models if resolve_price(m, pricing) is None})
