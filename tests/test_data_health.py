"""Skip accounting: SkipLog.catch turns any per-record failure into one counted skip."""

from __future__ import annotations

import pytest

from owl_lightning.data.health import (
    MISSING_IMAGE,
    TOO_LONG,
    UNEXPECTED,
    SkipLog,
    SkipSample,
)

# -- SkipLog.catch ------------------------------------------------------------------------------------


def test_catch_records_a_skip_with_its_reason_and_goes_on():
    skips = SkipLog()
    with skips.catch("a.json#3") as caught:
        raise SkipSample(TOO_LONG, "far too long")
    assert caught.skip.reason == TOO_LONG
    assert skips.drain() == [(TOO_LONG, "a.json#3")] and skips.last == "a.json#3 (too_long: far too long)"


@pytest.mark.parametrize("error", [RecursionError("deep"), TypeError("not a str"), ValueError("embedded null byte"), KeyError("x")])
def test_catch_records_any_other_failure_as_unexpected_naming_its_type(error, caplog):
    skips = SkipLog()
    with skips.catch("s.tar:000001") as caught:
        raise error
    assert caught.skip.reason == UNEXPECTED and caught.skip.detail.startswith(type(error).__name__)
    assert skips.drain() == [(UNEXPECTED, "s.tar:000001")]
    assert "Traceback" in caplog.text  # an unforeseen failure shows where it came from


def test_catch_lets_a_clean_block_through_and_passes_what_is_not_a_records_fault():
    skips = SkipLog()
    with skips.catch("x") as caught:
        pass
    assert caught.skip is None and skips.drain() == []
    for error in (KeyboardInterrupt(), MemoryError(), SystemExit(1)):
        with pytest.raises(type(error)), skips.catch("x"):
            raise error
    assert skips.drain() == []


def test_warnings_stop_after_the_first_twenty_but_counting_does_not(caplog):
    skips = SkipLog()
    for index in range(30):
        with skips.catch(f"f#{index}"):
            raise SkipSample(MISSING_IMAGE, "x" * 10_000)
    assert len(skips.drain()) == 30
    assert caplog.text.count("skipped f#") == 20
    assert len(caplog.records[0].getMessage()) < 1000  # a record's detail is shortened in the log
