"""A worker counts source offsets its consumer never delivered (vigil/worker.py `BatchRunner`)."""

from __future__ import annotations

from typing import Any

from streams.ports import LogRecord
from streams.processors.device import DeviceStage
from vigil.worker import OFFSET_GAPS, BatchRunner


def _runner() -> BatchRunner:
    def unused() -> Any:
        raise AssertionError("not reached")

    return BatchRunner(DeviceStage(), unused, unused)


def _records(*offsets: int) -> list[LogRecord]:
    return [LogRecord("vigil.ingest.v1", 0, o, "mon-1", b"") for o in offsets]


def _gaps() -> float:
    return OFFSET_GAPS.labels("device")._value.get()  # type: ignore[attr-defined, no-any-return]


def test_contiguous_offsets_after_the_applied_one_are_no_gap() -> None:
    before = _gaps()
    _runner()._check_contiguous("vigil.ingest.v1", 0, 9, _records(10, 11, 12))
    _runner()._check_contiguous("vigil.ingest.v1", 0, -1, _records(5, 6))  # nothing applied yet
    assert _gaps() == before


def test_a_hole_before_or_inside_a_batch_is_counted() -> None:
    before = _gaps()
    _runner()._check_contiguous("vigil.ingest.v1", 0, 9, _records(11, 12))  # 10 never came
    _runner()._check_contiguous("vigil.ingest.v1", 0, 20, _records(21, 24))  # 22 and 23 never came
    assert _gaps() == before + 3
