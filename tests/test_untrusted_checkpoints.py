"""Checkpoints and exports from elsewhere never run code and never choose where weights come from.

Each crafted input below would run a command (it creates a marker file) if anything unpickled it
with plain ``pickle`` or imported the Python files an export ships. Every path that reads a
checkpoint is tried: ``load_owl``, ``consolidate`` and the commands that take ``--ckpt``.
"""

import json
import os
import pickle

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter, save

from owl_lightning.checkpoints import (
    LLM_SOURCE_FLAG,
    SHARDED_METADATA_FILE,
    TRUST_REMOTE_CODE_FLAG,
    UntrustedCheckpoint,
    export_checkpoint,
    is_base_llm_weight,
    load_owl,
    read_checkpoint,
)
from owl_lightning.cli import main
from owl_lightning.config import CHECKPOINT_PREFIX, get_config
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import build_owl


class RunsCommand:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a crafted input ran code"


def tiny_checkpoint(path, **config_changes):
    """An owl-tiny checkpoint as the training systems save it (no base LLM), its config changed by ``config_changes``."""
    config = get_config("owl-tiny")
    model = build_owl(config, tokenizer=load_tokenizer(config.llm))
    state = {CHECKPOINT_PREFIX + k: v for k, v in model.state_dict().items() if not is_base_llm_weight(CHECKPOINT_PREFIX + k)}
    stored = config.to_dict()
    for dotted, value in config_changes.items():
        section, key = dotted.split("__")
        stored[section][key] = value
    torch.save({"state_dict": state, "owl_config": stored}, path)
    return path


def sharded_checkpoint(folder, extra=None):
    """A sharded checkpoint folder as ModelParallelStrategy writes it: DCP shards + ``.metadata`` + ``meta.pt``."""
    checkpoint = torch.load(tiny_checkpoint(folder.parent / "whole.ckpt"), weights_only=True)
    save({"state_dict": checkpoint["state_dict"], **(extra or {})}, storage_writer=FileSystemWriter(folder), no_dist=True)
    torch.save({"owl_config": checkpoint["owl_config"], "global_step": 1}, folder / SHARDED_METADATA_FILE)
    return folder


def every_reader(path, tmp_path):
    """Each way a user hands a checkpoint over; each must refuse it with UntrustedCheckpoint or a clean exit."""
    with pytest.raises(UntrustedCheckpoint):
        read_checkpoint(path)
    with pytest.raises(UntrustedCheckpoint):
        load_owl(path)
    for argv in (
        ["consolidate", str(path), str(tmp_path / "out.ckpt")],
        ["export", "--ckpt", str(path), "--out", str(tmp_path / "export")],
        ["chat", "--ckpt", str(path), "--prompt", "hello", "--device", "cpu"],
    ):
        with pytest.raises(SystemExit, match="error"):
            main(argv)


def test_a_sharded_checkpoint_loads_through_the_safe_reader(tmp_path):
    folder = sharded_checkpoint(tmp_path / "last.ckpt", extra={"note": {"epoch": 3, "name": "plain values load"}})
    checkpoint = read_checkpoint(folder)
    assert checkpoint["global_step"] == 1 and checkpoint["state_dict"]
    assert load_owl(folder) is not None


def test_crafted_sharded_metadata_is_refused_without_running_it(tmp_path, marker):
    folder = sharded_checkpoint(tmp_path / "last.ckpt")
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    every_reader(folder, tmp_path)


def test_a_crafted_non_tensor_item_is_refused_without_running_it(tmp_path, marker):
    folder = sharded_checkpoint(tmp_path / "last.ckpt", extra={"loop": RunsCommand(marker)})
    every_reader(folder, tmp_path)


def test_metadata_naming_a_shard_outside_its_folder_is_refused(tmp_path):
    folder = sharded_checkpoint(tmp_path / "last.ckpt")
    with open(folder / ".metadata", "rb") as file:
        metadata = pickle.load(file)  # our own file: trusted here
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UntrustedCheckpoint, match="outside"):
        read_checkpoint(folder)


def test_a_checkpoint_cannot_choose_its_llm_and_the_flag_can(tmp_path):
    path = tiny_checkpoint(tmp_path / "a.ckpt", llm__source=str(tmp_path / "some-llm"), llm__trust_remote_code=True)
    with pytest.raises(UntrustedCheckpoint, match=LLM_SOURCE_FLAG):
        load_owl(path)
    with pytest.raises(SystemExit, match=LLM_SOURCE_FLAG):
        main(["chat", "--ckpt", str(path), "--prompt", "hello", "--device", "cpu"])
    model = load_owl(path, llm_source="random")  # what the caller trusts, not what the file says
    assert model.config.llm.source == "random" and not model.config.llm.trust_remote_code


def _export_with_code(tmp_path, marker, model_type):
    """An export whose ``owl.json`` asks for remote code and another LLM, and whose ``llm/`` ships Python."""
    out = export_checkpoint(tiny_checkpoint(tmp_path / "a.ckpt"), tmp_path / "export")
    owl = json.loads((out / "owl.json").read_text())
    owl["owl_config"]["llm"].update(trust_remote_code=True, source="someone/else")
    (out / "owl.json").write_text(json.dumps(owl))
    llm = out / "llm"
    (llm / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((llm / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (llm / "config.json").write_text(json.dumps(config))
    return out


def test_an_export_asking_for_remote_code_loads_without_it(tmp_path, marker):
    """A known architecture: transformers' own class loads it; the shipped file is never imported."""
    model = load_owl(_export_with_code(tmp_path, marker, "llama"))
    assert not model.config.llm.trust_remote_code and model.config.llm.source.endswith("llm")


def test_an_export_that_needs_its_own_code_names_the_flag(tmp_path, marker):
    out = _export_with_code(tmp_path, marker, "evil-architecture")
    with pytest.raises(UntrustedCheckpoint, match=TRUST_REMOTE_CODE_FLAG):
        load_owl(out)
    with pytest.raises(SystemExit, match=TRUST_REMOTE_CODE_FLAG):
        main(["chat", "--ckpt", str(out), "--prompt", "hello", "--device", "cpu"])
