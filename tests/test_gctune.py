"""The collector while a run sends: frozen and patient inside, as found outside — also
when runs overlap in one process."""

from __future__ import annotations

import gc

from batchgpt.gctune import SENDING_THRESHOLD, quiet_gc


def test_the_collector_is_quiet_while_sending_and_as_found_after() -> None:
    before = gc.get_threshold()
    with quiet_gc():
        assert gc.get_threshold() == SENDING_THRESHOLD
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_overlapping_runs_leave_the_process_as_they_found_it() -> None:
    before = gc.get_threshold()
    first, second = quiet_gc(), quiet_gc()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first run ends while the second still sends
    assert gc.get_threshold() == SENDING_THRESHOLD
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_cycles_made_while_sending_are_still_collected() -> None:
    class Node:
        other: object = None

    with quiet_gc():
        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2
