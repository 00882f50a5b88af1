"""``batchgpt status`` for a ``mode: batch`` job: its batches as the ledger last saw
them (no network)."""

from __future__ import annotations

import time
from typing import Any

from batchgpt.config import JobConfig
from batchgpt.store.batches import BatchLedger


def batch_rows(job: JobConfig) -> list[dict[str, Any]]:
    """``status``: the job's batches as its ledger last saw them (no network)."""
    ledger = BatchLedger.open_readonly(job.state_dir)
    if ledger is None:
        return []
    try:
        now = time.time()
        return [{"batch": s.batch_id, "submission": s.sub_id, "state": s.state.value,
                 "provider_status": s.provider_status, "model": s.model, "rows": s.rows,
                 "counts": s.counts, "age_s": round(now - s.created_at, 1),
                 "expires_at": s.expires_at} for s in ledger.submissions()]
    finally:
        ledger.close()


def render_batches(batches: list[dict[str, Any]]) -> list[str]:
    """``status``'s lines for the job's batches, newest last."""
    lines = ["  batches"]
    for b in batches:
        counts = b["counts"]
        done = (f"{counts.get('completed', 0):,} done, {counts.get('failed', 0):,} failed"
                if counts else "-")
        expires = ("expires " + time.strftime("%Y-%m-%d %H:%M UTC",
                                              time.gmtime(b["expires_at"]))
                   if b["expires_at"] else "")
        lines.append(f"    {b['batch'] or b['submission']}  {b['state']}"
                     + (f" ({b['provider_status']})" if b["provider_status"] else "")
                     + f"  {b['rows']:,} rows  {done}  age {_age(b['age_s'])}"
                     + (f"  {expires}" if expires and b["state"] == "submitted" else ""))
    return lines


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
