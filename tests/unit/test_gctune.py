"""vigil/gctune.py: the collector's thresholds from VIGIL_GC_THRESHOLD, a clear exit on a bad value."""

from __future__ import annotations

import gc

import pytest

from vigil import gctune


@pytest.fixture(autouse=True)
def _restore() -> object:
    before = gc.get_threshold()
    yield None
    gc.set_threshold(*before)


def test_default_and_override_and_python() -> None:
    assert gctune.tune({}) == gctune.DEFAULT == gc.get_threshold()
    assert gctune.tune({gctune.GC_THRESHOLD_ENV: "1000,20,30"}) == (1000, 20, 30) == gc.get_threshold()
    assert gctune.tune({gctune.GC_THRESHOLD_ENV: "python"}) == (1000, 20, 30)  # left as it is


@pytest.mark.parametrize("bad", ["fast", "1,2", "0,10,10", "1,-1,2"])
def test_a_bad_value_stops_with_its_name(bad: str) -> None:
    with pytest.raises(SystemExit, match=gctune.GC_THRESHOLD_ENV):
        gctune.tune({gctune.GC_THRESHOLD_ENV: bad})
