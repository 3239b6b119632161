"""Skip accounting: SkipLog.catch turns any per-record failure into one counted skip; DataHealth holds
read-time skips against the records read, stream skips against the samples drawn, and each limit apart."""

from __future__ import annotations

import json

import pytest
import yaml

from owl_lightning.config import IGNORE_INDEX, get_config
from owl_lightning.data.health import (
    EMPTY_SOURCE,
    MALFORMED_RECORD,
    MISSING_IMAGE,
    TOO_LONG,
    UNEXPECTED,
    DataHealth,
    SkipLog,
    SkipRateExceeded,
    SkipSample,
)
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.train.datamodules import InstructionDataModule

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


# -- DataHealth --------------------------------------------------------------------------------------


def refused(count: int, path: str = "big.json") -> list[tuple[str, str]]:
    return [(MALFORMED_RECORD, f"{path}#{index}") for index in range(count)]


def test_read_time_skips_count_against_the_records_read():
    health = DataHealth()  # the default limit: 10%
    health.record_read("big", "big.json", kept=9_800, skipped=refused(200))
    health.check_read()  # 2%: fine, though no batch was drawn yet
    assert health.read_skip_fraction() == pytest.approx(0.02)
    health.check()  # and the stream has nothing against it
    health.record_read("small", "small.json", kept=100, skipped=refused(1_000, "small.json"))
    with pytest.raises(SkipRateExceeded, match=r"1200 of 11100 records read at setup.*small\.json \(1000\)"):
        health.check_read()


def test_reading_a_source_again_replaces_its_counts():
    health = DataHealth()
    for _ in range(3):
        health.record_read("big", "big.json", kept=9_800, skipped=refused(200))
    assert health.read_by_source["big"].skipped == 200
    assert health.metrics()["data/skipped/malformed_record"] == 200


def test_stream_skips_count_against_the_samples_drawn():
    health = DataHealth()
    health.update(["a"] * 190, refused(10))
    with pytest.raises(SkipRateExceeded, match="samples drawn for batches"):
        health.update(["a"] * 10, refused(30))


def test_metrics_report_both_kinds_under_a_prefix_and_state_round_trips():
    health = DataHealth()
    health.record_read("big", "big.json", kept=90, skipped=refused(10))
    health.update(["big"] * 8, [(MISSING_IMAGE, "big.json#4"), (MALFORMED_RECORD, "big.json#5")])
    metrics = health.metrics(prefix="val/data")
    assert metrics["val/data/skipped/malformed_record"] == 11 and metrics["val/data/skipped/missing_image"] == 1
    assert metrics["val/data/skipped_fraction"] == pytest.approx(0.2)
    assert metrics["val/data/skipped_fraction_at_read"] == pytest.approx(0.1)
    assert metrics["val/data/share/big"] == 1.0
    restored = DataHealth()
    restored.load_state_dict(health.state_dict())
    assert restored.state_dict() == health.state_dict() and restored.metrics() == health.metrics()
    restored.clear_stream_counts()
    assert restored.used == 0 and restored.skipped == 0 and restored.read_by_source == health.read_by_source


def test_token_shares_weigh_each_source_by_its_supervised_tokens_and_survive_a_resume():
    health = DataHealth()
    health.update(["short", "short", "short", "long"], [], supervised_tokens=[2, 2, 2, 94])
    metrics = health.metrics()
    assert metrics["data/share/long"] == 0.25 and metrics["data/token_share/long"] == pytest.approx(0.94)
    restored = DataHealth()
    restored.load_state_dict(health.state_dict())
    assert restored.metrics() == metrics
    restored.clear_stream_counts()
    assert not any(name.startswith("data/token_share/") for name in restored.metrics())


# -- the stage-2 data module --------------------------------------------------------------------------


def write_manifest(tmp_path, train_records: list, val_records: list | None = None) -> str:
    (tmp_path / "train.json").write_text(json.dumps(train_records))
    manifest = {"train": [{"name": "alpaca", "format": "alpaca", "path": "train.json"}]}
    if val_records is not None:
        (tmp_path / "val.json").write_text(json.dumps(val_records))
        (tmp_path / "empty.jsonl").write_bytes(b"")
        manifest["val"] = [
            {"name": "alpaca_val", "format": "alpaca", "path": "val.json"},
            {"name": "empty_val", "format": "owl_jsonl", "path": "empty.jsonl"},
        ]
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return str(tmp_path / "manifest.yaml")


def alpaca(count: int, bad: int) -> list[dict]:
    """``count`` records, the first ``bad`` of them with a wrong-typed output."""
    return [{"instruction": f"Say {i}.", "output": i if i < bad else str(i)} for i in range(count)]


def data_module(manifest: str, **kwargs) -> InstructionDataModule:
    data = InstructionDataModule(manifest=manifest, processor=OwlProcessor(get_config("owl-tiny")), num_workers=0, **kwargs)
    data.setup("fit")
    return data


def test_200_bad_records_in_a_large_source_do_not_stop_setup_under_the_default_limit(tmp_path):
    data = data_module(write_manifest(tmp_path, alpaca(10_000, bad=200)))
    for _ in range(2):  # set up twice (as a resumed run reads its sources again): counted once
        data.train_dataloader()
    assert data.health.read_by_source["alpaca"].kept == 9_800
    assert data.health.metrics()["data/skipped/malformed_record"] == 200
    assert data.health.skipped == 0 and data.health.used == 0


def test_a_source_mostly_bad_stops_setup_naming_its_file(tmp_path):
    data = data_module(write_manifest(tmp_path, alpaca(1_000, bad=200)))
    with pytest.raises(SkipRateExceeded, match=r"200 of 1000 records read at setup.*train\.json"):
        data.train_dataloader()


def test_validation_skips_are_kept_apart_and_never_stop_the_run(tmp_path):
    """A validation file that is half bad (and an empty one): counted in ``val_health`` only."""
    data = data_module(write_manifest(tmp_path, alpaca(300, bad=0), val_records=alpaca(400, bad=200)))
    data.train_dataloader()
    data.val_dataloader()
    assert data.health.metrics() == {"data/skipped_fraction": 0.0, "data/skipped_fraction_at_read": 0.0}
    val = data.val_health.metrics(prefix="val/data")
    assert val["val/data/skipped/malformed_record"] == 200 and val["val/data/skipped/empty_source"] == 1
    assert EMPTY_SOURCE in data.val_health.read_by_source["empty_val"].skipped_by_reason


def test_validation_skips_are_logged_under_val_in_a_run(tmp_path):
    from tests.helpers import fit, tiny_system

    system = tiny_system("stage2", warmup_steps=0)
    data = InstructionDataModule(
        manifest=write_manifest(tmp_path, alpaca(40, bad=0), val_records=alpaca(40, bad=20)),
        processor=system.processor,
        batch_size=4,
        num_workers=0,
        max_length=256,
    )
    trainer = fit(system, data, tmp_path, steps=2, val_check_interval=2, limit_val_batches=1)
    assert trainer.callback_metrics["val/data/skipped/malformed_record"] == 20
    assert "data/skipped/malformed_record" not in trainer.callback_metrics
    assert data.health.skipped == 0 and "alpaca_val" not in data.health.read_by_source


def test_each_batch_counts_the_supervised_tokens_of_each_sample_by_source(tmp_path):
    (tmp_path / "short.json").write_text(json.dumps([{"instruction": f"Say {i}.", "output": "yes"} for i in range(20)]))
    long_answer = " ".join(["a long answer that goes on"] * 8)
    (tmp_path / "long.json").write_text(json.dumps([{"instruction": f"Tell {i}.", "output": long_answer} for i in range(20)]))
    sources = [{"name": name, "format": "alpaca", "path": f"{name}.json", "weight": 1.0} for name in ("short", "long")]
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump({"train": sources}))
    batch = next(iter(data_module(str(tmp_path / "manifest.yaml"), batch_size=8).train_dataloader()))
    assert len(batch["supervised_tokens"]) == len(batch["source"]) == 8
    assert sum(batch["supervised_tokens"]) == int((batch["labels"] != IGNORE_INDEX).sum())
    health = DataHealth()
    health.update(batch["source"], batch["skipped"], supervised_tokens=batch["supervised_tokens"])
    metrics = health.metrics()
    assert metrics["data/token_share/long"] > metrics["data/share/long"] > 0
