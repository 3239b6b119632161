"""FSDP2 through Lightning's ModelParallelStrategy: 2 CPU processes over gloo, on owl-tiny.

Each run is the real ``owl-lightning stageN fit`` command in a subprocess (Lightning starts the
second rank by re-running it); the :class:`ShardReport` callback below, loaded by that command
from this file, writes what every rank holds at the start and the end of training.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from owl_lightning.checkpoints import is_base_llm_weight, is_sharded_checkpoint, load_owl, read_checkpoint, read_sharded_checkpoint
from owl_lightning.cli import main
from owl_lightning.config import STAGE1, get_config
from owl_lightning.models.llm import build_llm, load_tokenizer
from owl_lightning.models.owl import build_owl
from owl_lightning.train.datamodules import CaptionDataModule
from owl_lightning.train.parallel import (
    AtomicModelParallelStrategy,
    assert_sharded,
    checkpoint_activations,
    choose_frozen_placement,
    llm_blocks,
    shard_owl,
)
from tests.helpers import TINY_YAML, fit, largest_difference, tiny_system

pytestmark = pytest.mark.slow  # multi-process runs

TESTS = Path(__file__).parent


class ShardReport(L.Callback):
    """Per rank, at train start and end: each parameter's local and full size, a hash of its full
    value, whether it is a DTensor; the FSDP units mixing trainable and frozen parameters; the
    global step and the optimizer's step count."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.val_batches = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "start")

    def on_validation_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.val_batches += not trainer.sanity_checking

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "end")

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, moment: str) -> None:
        params = {}
        for name, param in pl_module.model.named_parameters():
            sharded = isinstance(param, DTensor)
            full = param.full_tensor() if sharded else param  # a collective: every rank, same order
            params[name] = {
                "sharded": sharded,
                "local_numel": param.to_local().numel() if sharded else param.numel(),
                "numel": full.numel(),
                "dim0": full.shape[0] if full.ndim else 1,
                "trainable": param.requires_grad,
                "hash": digest(full),
            }
        adam_steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
        report = {
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "params": params,
            "mixed_units": mixed_units(pl_module.model),
            "adam_steps": sorted(adam_steps),
            "val_batches": self.val_batches,
            "rms_norm_eps": pl_module.model.llm.config.rms_norm_eps,
            "eos_token_id": llm_generating(pl_module.model.llm).generation_config.eos_token_id,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{moment}_rank{trainer.global_rank}.json").write_text(json.dumps(report))


def llm_generating(llm: torch.nn.Module) -> torch.nn.Module:
    """The model whose generation config generation reads (under LoRA, the base model)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()


def mixed_units(model: torch.nn.Module) -> list[list[str]]:
    """FSDP units holding both trainable and frozen parameters (there should be none)."""
    groups = {id(g): g for m in model.modules() if isinstance(m, FSDPModule) for g in m._get_fsdp_state()._fsdp_param_groups}
    return [
        [p._param_fqn for p in g.fsdp_params] for g in groups.values() if len({p.sharded_param.requires_grad for p in g.fsdp_params}) > 1
    ]


def run(
    stage: str,
    tmp_path: Path,
    manifest: Path,
    devices: int,
    max_steps: int,
    report: str,
    *extra: str,
    captions: bool = False,
    callbacks: tuple[dict, ...] = (),
    frozen_placement: str = "shard",
    hsdp_shard_size: int | None = None,
) -> list[dict]:
    """``owl-lightning <stage> fit`` on ``devices`` CPU processes; returns each rank's start and end reports.
    ``callbacks``: more trainer callbacks, as the YAML names them. Frozen weights are sharded like the
    trainable ones unless ``frozen_placement`` says otherwise (the strategy's own default is ``auto``)."""
    root = tmp_path / stage
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "gradient_clip_val": 1.0,
            "default_root_dir": str(root),
            "strategy": {
                "class_path": "owl_lightning.train.parallel.AtomicModelParallelStrategy",
                "init_args": {
                    "data_parallel_size": devices,
                    "tensor_parallel_size": 1,
                    "frozen_placement": frozen_placement,
                    "hsdp_shard_size": hsdp_shard_size,
                },
            },
            "callbacks": [
                {
                    "class_path": "owl_lightning.train.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "save_top_k": 0, "every_n_train_steps": 2},
                },
                {"class_path": "test_fsdp.ShardReport", "init_args": {"out": str(tmp_path / report)}},
                {"class_path": "owl_lightning.train.callbacks.StepThroughput", "init_args": {"peak_flops": 1e11}},
                *([{"class_path": "owl_lightning.train.callbacks.CaptionSamples", "init_args": {"num_images": 2}}] if captions else []),
                *callbacks,
            ],
        },
        "model": {"config": str(TINY_YAML), "optimizer": {"lr": 1e-2, "warmup_steps": 0}},
        "data": {"manifest": str(manifest), "batch_size": 4, "num_workers": 0},
    }
    path = tmp_path / f"{stage}_{report}.yaml"
    path.write_text(yaml.safe_dump(config))
    # One thread per process: the two ranks share the machine's cores.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "owl_lightning", stage, "fit", "--config", str(path), "--ckpt_path", "last", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode:
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return [
        {moment: json.loads((tmp_path / report / f"{moment}_rank{rank}.json").read_text()) for moment in ("start", "end")}
        for rank in range(devices)
    ]


def assert_sharded_and_in_agreement(ranks: list[dict]) -> None:
    """Every parameter a DTensor split over the ranks (each holds a part), the same full values on every rank,
    and no FSDP unit mixing trainable with frozen parameters."""
    first = ranks[0]["end"]["params"]
    for name, info in first.items():
        assert all(r["end"]["params"][name]["sharded"] for r in ranks), name
        local = [r["end"]["params"][name]["local_numel"] for r in ranks]
        assert sum(local) == info["numel"], (name, local)
        if info["dim0"] >= len(ranks):
            assert all(local), (name, local)  # sharded on dim 0: every rank holds rows
        assert len({r["end"]["params"][name]["hash"] for r in ranks}) == 1, f"ranks disagree on {name}"
    assert all(r["end"]["mixed_units"] == [] for r in ranks)


def moved(report: dict) -> set[str]:
    return {n for n, info in report["end"]["params"].items() if info["hash"] != report["start"]["params"][n]["hash"]}


def assert_resumed_from(resumed: dict, saved: dict, steps: int) -> None:
    """The resumed run started from the saved weights and optimizer state, at the saved step."""
    assert resumed["start"]["global_step"] == steps and resumed["start"]["adam_steps"] == [steps]
    for name, info in saved["end"]["params"].items():
        assert resumed["start"]["params"][name]["hash"] == info["hash"], name


def test_stage1_shards_resumes_on_one_process_and_consolidates(tmp_path, caption_manifest):
    # Validation at step 2 generates captions: ranks must stay in step through generation too.
    # One validation shard of 12 samples for two ranks: each reads it and keeps every other sample, 6, in
    # batches of 4: 4 and 2. The whole pass (1.0: a bare "1" parses as 1.0 too, not as one batch).
    validation = ["--trainer.limit_val_batches", "1.0", "--trainer.val_check_interval", "2"]
    two = run("stage1", tmp_path, caption_manifest, 2, 2, "two", *validation, captions=True)
    assert_sharded_and_in_agreement(two)
    assert [r["end"]["val_batches"] for r in two] == [2, 2]
    assert all(r["end"]["world_size"] == 2 and r["end"]["global_step"] == 2 for r in two)
    changed = moved(two[0])
    assert any(n.startswith("vision.") for n in changed) and any(n.startswith("abstractor.") for n in changed)
    assert not any(n.startswith("llm.") for n in changed)

    last = tmp_path / "stage1" / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(last) and len(list(last.glob("*.distcp"))) == 2
    checkpoint = read_checkpoint(last)  # every shard, in one process
    assert checkpoint["global_step"] == 2 and checkpoint["owl_config"]["name"] == "owl-tiny"
    assert not any(is_base_llm_weight(k) for k in checkpoint["state_dict"])

    # The weights and optimizer state resume on any number of processes; the data streams only on as many
    # as wrote them, unless the rest of the epoch may come from fresh streams.
    one = run("stage1", tmp_path, caption_manifest, 1, 4, "one", "--data.allow_new_layout", "true")
    assert_resumed_from(one[0], two[0], steps=2)
    assert one[0]["end"]["global_step"] == 4 and one[0]["end"]["params"]["vision.model.cls_token"]["sharded"]

    # One portable file: the model loads from it, and its optimizer state is keyed as a plain Trainer expects.
    main(["consolidate", str(last), str(tmp_path / "stage1.ckpt")])
    file = torch.load(tmp_path / "stage1.ckpt", weights_only=True)
    assert file["global_step"] == 4
    assert all(isinstance(k, int) for k in file["optimizer_states"][0]["state"])
    model = load_owl(tmp_path / "stage1.ckpt")
    for name, info in one[0]["end"]["params"].items():
        assert digest(model.get_parameter(name)) == info["hash"], name

    # A plain single-process Trainer (no FSDP) resumes from it, optimizer state included.
    system = tiny_system("stage1", lr=1e-2, warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
    trainer = L.Trainer(
        max_steps=5,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path / "plain",
        accelerator="cpu",
    )
    trainer.fit(system, data, ckpt_path=tmp_path / "stage1.ckpt")
    assert trainer.global_step == 5
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {5}


def saved_llm(folder: Path) -> dict[str, str]:
    """owl-tiny's LLM saved as a Hugging Face folder whose config differs from owl-tiny's ``architecture``
    (RMSNorm epsilon, generation's EOS); returns its weights' digests."""
    config = get_config("owl-tiny")
    llm = build_llm(replace(config.llm, architecture={**config.llm.architecture, "rms_norm_eps": 0.25}), load_weights=False)
    llm.generation_config.eos_token_id = 7
    llm.save_pretrained(folder)
    return {name: digest(p) for name, p in llm.named_parameters()}


def test_stage2_lora_units_bf16_activation_checkpointing_and_resume(tmp_path, instruction_manifest):
    # The LLM comes from a folder: only rank 0 reads it; rank 1 builds from the config rank 0 read.
    pretrained = saved_llm(tmp_path / "llm")
    extra = [
        "--data.max_length",
        "256",
        "--model.activation_checkpointing",
        "true",
        "--trainer.precision",
        "bf16-mixed",
        "--model.config.llm.source",
        str(tmp_path / "llm"),
    ]
    two = run("stage2", tmp_path, instruction_manifest, 2, 2, "two", *extra)
    assert_sharded_and_in_agreement(two)
    assert all(r["start"]["rms_norm_eps"] == 0.25 and r["start"]["eos_token_id"] == 7 for r in two)
    for rank in two:  # the folder's weights, on every rank
        started = {
            n.removeprefix("llm.base_model.model.").replace(".base_layer", ""): info["hash"]  # LoRA's names
            for n, info in rank["start"]["params"].items()
        }
        assert {n: started[n] for n in pretrained} == pretrained
    changed = moved(two[0])
    llm_changed = {n for n in changed if n.startswith("llm.")}
    assert llm_changed and all("lora_" in n for n in llm_changed)
    assert any(n.startswith("abstractor.") for n in changed) and not any(n.startswith("vision.") for n in changed)

    one = run("stage2", tmp_path, instruction_manifest, 1, 4, "one", *extra)
    assert_resumed_from(one[0], two[0], steps=2)


def test_stage2_full_fine_tuning_shards_the_llm_and_its_optimizer_state_and_checkpoints_it(tmp_path, instruction_manifest):
    """The whole LLM trains (recipe llm: full, its own learning rate): every LLM weight sharded and moved,
    and the sharded checkpoint holds the LLM, which a one-process resume starts from."""
    extra = ["--data.max_length", "256", "--model.recipe.llm", "full", "--model.optimizer.llm_lr", "1e-3"]
    two = run("stage2", tmp_path, instruction_manifest, 2, 2, "two", *extra)
    assert_sharded_and_in_agreement(two)
    llm = {n for n in two[0]["end"]["params"] if n.startswith("llm.")}
    assert llm and not any("lora_" in n for n in llm)
    changed = moved(two[0])
    # Every LLM matrix moves (the tied embeddings included); the frozen vision encoder does not.
    assert {n for n in llm if two[0]["end"]["params"][n]["dim0"] > 1} <= changed
    assert not any(n.startswith("vision.") for n in changed)
    one = run("stage2", tmp_path, instruction_manifest, 1, 4, "one", *extra)
    assert_resumed_from(one[0], two[0], steps=2)


def test_a_sharded_save_killed_midway_leaves_the_previous_checkpoint_whole(
    tmp_path, caption_manifest, own_process_group, monkeypatch, caplog
):
    system = tiny_system("stage1", lr=1e-2, warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
    trainer = fit(system, data, tmp_path, steps=2, strategy=AtomicModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    assert "writes each sharded checkpoint over the previous one" not in caplog.text
    last = tmp_path / "last.ckpt"
    trainer.save_checkpoint(last)
    saved = read_sharded_checkpoint(last)
    with torch.no_grad():
        for p in system.model.abstractor.parameters():
            p.add_(1.0)

    # Killed after every shard is written, before rank 0's meta.pt: Lightning's own strategy would
    # leave the new shards under the old meta.pt.
    save = torch.save

    def killed_before_meta(obj, f, *args, **kwargs):
        if str(f).endswith("meta.pt"):
            raise KeyboardInterrupt("killed while saving")
        return save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", killed_before_meta)
        with pytest.raises(KeyboardInterrupt):
            trainer.save_checkpoint(last)
    after_kill = read_sharded_checkpoint(last)
    assert after_kill["global_step"] == saved["global_step"] == 2
    assert after_kill["state_dict"].keys() == saved["state_dict"].keys()
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(after_kill["state_dict"][name], tensor), name
    assert len(list(tmp_path.glob(".last.ckpt-*"))) == 2  # the published save and the killed one's staging folder

    trainer.save_checkpoint(last)  # the next save completes and clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir() if "last" in p.name) == sorted(["last.ckpt", os.readlink(last)])
    resaved = read_sharded_checkpoint(last)["state_dict"]
    moved = [n for n in saved["state_dict"] if n.startswith("model.abstractor.") and not torch.equal(resaved[n], saved["state_dict"][n])]
    assert moved


def test_lightnings_own_model_parallel_strategy_is_warned_about(tmp_path, caption_manifest, own_process_group, caplog):
    system = tiny_system("stage1")
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
    fit(system, data, tmp_path, steps=1, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    assert "ModelParallelStrategy writes each sharded checkpoint over the previous one" in caplog.text
    assert "owl_lightning.train.parallel.AtomicModelParallelStrategy" in caplog.text


@pytest.fixture
def one_process_mesh():
    """A one-process gloo group and its mesh: enough for fully_shard to build DTensors in this process."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    torch.distributed.destroy_process_group()


def stage2_model(tiny_config, tiny_tokenizer):
    torch.manual_seed(0)
    model = build_owl(tiny_config, tokenizer=tiny_tokenizer)
    model.add_lora(tiny_config.lora)
    model.vision.requires_grad_(False)
    return model


def test_sharded_model_computes_the_same_with_lora_in_units_of_its_own(one_process_mesh, tiny_config, tiny_tokenizer):
    model = stage2_model(tiny_config, tiny_tokenizer)
    whole = copy.deepcopy(model)
    shard_owl(model, one_process_mesh)
    assert mixed_units(model) == []
    ids = torch.tensor([[tiny_tokenizer.bos_token_id, tiny_tokenizer.convert_tokens_to_ids("<image>"), 97, 98, 99]])
    images = torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)
    losses = [m(ids, torch.ones_like(ids), ids, images, torch.tensor([1])).loss for m in (model, whole)]
    torch.testing.assert_close(losses[0], losses[1])

    # The check has teeth: whole decoder blocks as units would mix LoRA with the frozen weights.
    naive = stage2_model(tiny_config, tiny_tokenizer)
    for block in llm_blocks(naive):
        fully_shard(block, mesh=one_process_mesh)
    assert len(mixed_units(naive)) == len(llm_blocks(naive))


def test_a_clip_through_the_sharded_model_computes_as_the_whole_model(one_process_mesh, tiny_config, tiny_tokenizer):
    """The temporal embedding runs before the connector's forward: its own unit gathers it (docs/video.md)."""
    model = stage2_model(tiny_config, tiny_tokenizer)
    with torch.no_grad():
        model.abstractor.temporal_embedding.weight.normal_()
    whole = copy.deepcopy(model)
    shard_owl(model, one_process_mesh)
    ids = torch.tensor([[tiny_tokenizer.bos_token_id, tiny_tokenizer.convert_tokens_to_ids("<image>"), 97, 98, 99]])
    frames = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    clip = {"image_counts": torch.tensor([1]), "image_frames": torch.tensor([4])}
    losses = [m(ids, torch.ones_like(ids), ids, frames, **clip).loss for m in (model, whole)]
    torch.testing.assert_close(losses[0], losses[1])
    losses[0].backward()
    assert model.abstractor.temporal_embedding.weight.grad is not None


# owl-tiny with a CNN encoder: BatchNorm statistics are buffers the state dict holds.
CNN_TINY = {"vision.timm_name": "test_efficientnet", "vision.timm_kwargs": {}}


def _build_for_rank(rank: int, rank1_builds: str, lora: bool) -> torch.nn.Module:
    """Rank 0: seed 0, real weights. Rank 1: nothing (``meta``) or real weights from another seed."""
    config = get_config("owl-tiny", CNN_TINY)
    torch.manual_seed(0 if rank == 0 else 1)
    with torch.device("meta") if rank and rank1_builds == "meta" else contextlib.nullcontext():
        model = build_owl(config, pretrained=not rank or rank1_builds != "meta", tokenizer=load_tokenizer(config.llm))
        if lora:
            model.add_lora(config.lora)
    return model


def _shard_and_compare(rank: int, store: str, rank1_builds: str, lora: bool) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = _build_for_rank(rank, rank1_builds, lora)
        shard_owl(model, init_device_mesh("cpu", (2,)))
        reference = _build_for_rank(0, rank1_builds, lora)  # rank 0's model, unsharded, on every rank
        for name, param in model.named_parameters():
            assert param.to_local().numel() < param.numel() or param.shape[0] < 2, f"{name} is not split"
            assert torch.equal(param.full_tensor(), reference.get_parameter(name)), f"rank {rank}: {name}"
        buffers = dict(reference.named_buffers())
        for name, buffer in model.named_buffers():  # BatchNorm statistics; rotary frequencies, pixel mean/std (not saved)
            assert torch.equal(buffer, buffers[name]), f"rank {rank}: {name}"
        ids = torch.tensor([[257, model.image_token_id, 97, 98, 99]])
        images = torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        for m in (model, reference):
            m.eval()
        losses = [m(ids, torch.ones_like(ids), ids, images, torch.tensor([1])).loss for m in (model, reference)]
        torch.testing.assert_close(losses[0], losses[1])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(("rank1_builds", "lora"), [("meta", False), ("meta", True), ("other-seed", True)])
def test_every_rank_starts_from_rank0s_weights(tmp_path, rank1_builds, lora):
    """Only rank 0 reads weights: rank 1 builds on meta (or from another seed) and ends up with its
    shards of rank 0's parameters and rank 0's buffers, and computes rank 0's loss."""
    torch.multiprocessing.spawn(_shard_and_compare, args=(str(tmp_path / "store"), rank1_builds, lora), nprocs=2)


def test_forgotten_sharding_is_an_error(tiny_model):
    with pytest.raises(RuntimeError, match="not sharded"):
        assert_sharded(tiny_model)


def test_activation_checkpointing_keeps_loss_and_gradients(tiny_config, tiny_tokenizer):
    def loss_and_grads(checkpointed: bool):
        torch.manual_seed(0)
        model = build_owl(tiny_config, tokenizer=tiny_tokenizer)
        model.apply_recipe(STAGE1)
        if checkpointed:
            checkpoint_activations(model)
        ids = torch.tensor([[tiny_tokenizer.bos_token_id, tiny_tokenizer.convert_tokens_to_ids("<image>"), 97, 98, 99]])
        images = torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)
        out = model(ids, torch.ones_like(ids), ids, images, torch.tensor([1]))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    torch.testing.assert_close(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_ddp_keeps_ranks_in_agreement(tmp_path, caption_manifest, instruction_manifest, stage):
    """Models that fit one device may use DDP instead (``--trainer.strategy ddp``)."""
    manifest = caption_manifest if stage == "stage1" else instruction_manifest
    two = run(stage, tmp_path, manifest, 2, 3, "two", "--trainer.strategy", "ddp")
    for name, info in two[0]["end"]["params"].items():
        assert not info["sharded"] and two[1]["end"]["params"][name]["hash"] == info["hash"], f"ranks disagree on {name}"
    assert moved(two[0]) and all(r["end"]["global_step"] == 3 for r in two)


# The command-line arguments of each strategy the multi-process tests run under (run's YAML: FSDP2, frozen sharded).
STRATEGY_ARGUMENTS = {
    "fsdp": [],
    "fsdp-frozen-replicated": ["--trainer.strategy.init_args.frozen_placement", "replicate"],
    "ddp": ["--trainer.strategy", "ddp"],
}


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_ranks_with_and_without_images_in_one_step(tmp_path, instruction_manifest, strategy):
    """Text 7 : VQA 1 in batches of 4: each batch holds 0 or 1 image, so in one step a rank with an
    image and a rank without run together; both must run the same collectives."""
    manifest = yaml.safe_load(instruction_manifest.read_text())
    manifest["train"][1]["weight"] = 7
    instruction_manifest.write_text(yaml.safe_dump(manifest))
    two = run("stage2", tmp_path, instruction_manifest, 2, 4, "two", *STRATEGY_ARGUMENTS[strategy])
    assert all(r["end"]["global_step"] == 4 for r in two)


def test_validation_ends_together_on_uneven_shards(tmp_path, caption_manifest):
    """3 validation shards of 12 for 2 ranks in batches of 4: rank 0 holds 6 batches, rank 1 3. Under
    FSDP a rank validating alone would wait forever on the other's all-gathers; both stop after 3."""
    manifest = yaml.safe_load(caption_manifest.read_text())
    manifest["val"][0]["shards"] = "shards/train-{000000..000002}.tar"
    caption_manifest.write_text(yaml.safe_dump(manifest))
    two = run(
        "stage1",
        tmp_path,
        caption_manifest,
        2,
        2,
        "two",
        "--trainer.limit_val_batches",
        "1.0",
        "--trainer.val_check_interval",
        "2",
    )
    assert [r["end"]["val_batches"] for r in two] == [3, 3]


def accumulation_runs(tmp_path: Path, manifest: Path, *extra: str) -> dict[str, list[dict]]:
    """Stage 1 on 2 processes, each rank training on the same 18 samples in optimizer steps 1-3: in
    micro-batches of 2 accumulated 3 at a time ("accumulated"; 10 micro-batches an epoch, so step 4 is the
    epoch's last window, of one micro-batch), and in batches of 6 ("large"). Returns each run's
    ``OptimizerStepReport`` per rank (``tests/helpers.py``)."""
    reports = {}
    for name, batch_size, accumulate, batches_per_epoch in (("accumulated", 2, 3, 10), ("large", 6, 1, 4)):
        folder = tmp_path / name
        folder.mkdir()
        settings = {
            "--data.batch_size": batch_size,
            "--data.batches_per_epoch": batches_per_epoch,
            "--trainer.accumulate_grad_batches": accumulate,
            # AdamW's eps at 1e-3: see OPTIMIZER in test_accumulation.py (float32 rounding against the tolerance).
            "--model.optimizer.eps": 1e-3,
        }
        arguments = [str(item) for pair in settings.items() for item in pair]
        steps = {"class_path": "helpers.OptimizerStepReport", "init_args": {"out": str(folder / "steps")}}
        run("stage1", folder, manifest, 2, 4, "shards", *arguments, *extra, callbacks=(steps,))
        reports[name] = [torch.load(folder / "steps" / f"rank{rank}.pt") for rank in range(2)]
    return reports


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp-frozen-replicated", "ddp"])
def test_accumulation_syncs_gradients_once_per_optimizer_step_and_trains_as_a_larger_batch(tmp_path, caption_manifest, strategy):
    """Under FSDP2 every micro-batch of a window but the last keeps its unsharded gradients (no
    reduce-scatter), with the frozen LLM sharded or replicated; under DDP Lightning's no_sync skips the
    all-reduces. The weights after each step equal those of the larger batch within 1e-6, and the epoch's
    last, shorter window syncs too."""
    runs = accumulation_runs(tmp_path, caption_manifest, *STRATEGY_ARGUMENTS[strategy])
    accumulated, large = runs["accumulated"], runs["large"]
    per_backward = large[0]["micro_batches"][0]["collectives"]  # reduce-scatters (FSDP2) or bucket all-reduces (DDP)
    assert per_backward > 0
    for rank in range(2):
        assert [m["stepped"] for m in accumulated[rank]["micro_batches"]] == [False, False, True] * 3 + [True]
        assert [m["collectives"] for m in large[rank]["micro_batches"]] == [per_backward] * 4
        assert [m["collectives"] for m in accumulated[rank]["micro_batches"]] == [0, 0, per_backward] * 3 + [per_backward]
        # Micro-batches of one step differ in supervised tokens: weighing them equally would show.
        assert len({m["supervised"] for m in accumulated[rank]["micro_batches"][:3]}) > 1
        for step in range(3):
            difference = largest_difference(accumulated[rank]["weights"][step], large[rank]["weights"][step])
            assert difference <= 1e-6, f"rank {rank}, step {step + 1}: {difference}"
        assert largest_difference(accumulated[rank]["weights"][3], accumulated[0]["weights"][3]) == 0  # ranks in step
    assert largest_difference(accumulated[0]["weights"][0], accumulated[0]["weights"][2]) > 1e-3  # it trained


def placement_runs(tmp_path: Path, manifest: Path, stage: str, devices: int, node_size: int, placements: list[str]) -> dict[str, list]:
    """``stage`` for 3 steps on ``devices`` processes, ``node_size`` to a "node", once per frozen placement.
    Returns each run's ``AllGatherReport`` per rank (``tests/helpers.py``), its weights under ``"weights"``."""
    reports = {}
    for placement in placements:
        folder = tmp_path / placement
        folder.mkdir()
        gathers = {"class_path": "helpers.AllGatherReport", "init_args": {"out": str(folder / "gathers"), "node_size": node_size}}
        extra = ["--data.max_length", "256"] if stage == "stage2" else []
        run(
            stage,
            folder,
            manifest,
            devices,
            3,
            "shards",
            *extra,
            callbacks=(gathers,),
            frozen_placement=placement,
            hsdp_shard_size=node_size,
        )
        reports[placement] = [
            {**json.loads((folder / "gathers" / f"rank{r}.json").read_text()), "weights": torch.load(folder / "gathers" / f"rank{r}.pt")}
            for r in range(devices)
        ]
    return reports


def frozen_llm_bytes(stage: str) -> int:
    """Bytes of owl-tiny's frozen LLM weights (fp32): all of them in stage 1, all but LoRA's in stage 2."""
    config = get_config("owl-tiny")
    llm = stage2_model(config, load_tokenizer(config.llm)).llm if stage == "stage2" else build_llm(config.llm, load_weights=False)
    return sum(p.numel() * p.element_size() for name, p in llm.named_parameters() if "lora_" not in name)


def per_step(report: dict, kind: str, key: str = "bytes") -> list[float]:
    return [m[key].get(kind, 0) for m in report["micro_batches"]]


def assert_same_training(runs: dict[str, list], reference: str, placement: str) -> None:
    """Every micro-batch's loss and the trained weights equal the reference placement's, on every rank."""
    for rank, (ref, other) in enumerate(zip(runs[reference], runs[placement])):
        losses = [m["loss"] for m in ref["micro_batches"]], [m["loss"] for m in other["micro_batches"]]
        torch.testing.assert_close(*losses, rtol=1e-6, atol=1e-6, msg=f"{placement}, rank {rank}: losses")
        assert largest_difference(ref["weights"], other["weights"]) <= 1e-6, f"{placement}, rank {rank}: weights"
    assert largest_difference(runs[placement][0]["weights"], runs[placement][-1]["weights"]) == 0  # ranks in step


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_replicated_frozen_weights_are_never_gathered_and_train_as_sharded_ones(tmp_path, caption_manifest, instruction_manifest, stage):
    """frozen_placement replicate: the frozen LLM (stage 2: its base weights beside the LoRA adapters) is
    never all-gathered, and the losses and trained weights are those of sharding everything. Sharded, the
    frozen LLM is gathered twice a step: for forward, and again for backward."""
    manifest = caption_manifest if stage == "stage1" else instruction_manifest
    runs = placement_runs(tmp_path, manifest, stage, devices=2, node_size=2, placements=["shard", "replicate"])
    assert_same_training(runs, "shard", "replicate")
    llm = frozen_llm_bytes(stage)
    for rank in range(2):
        assert per_step(runs["replicate"][rank], "frozen_llm") == [0, 0, 0]
        # Each rank receives the other's half of each frozen LLM weight, in forward and in backward.
        # (Stage 1: the input embeddings, tied to the output ones, are one unit gathered in both.)
        assert per_step(runs["shard"][rank], "frozen_llm") == pytest.approx([llm] * 3, rel=0.01)
        # The trainable units are gathered as before.
        assert per_step(runs["replicate"][rank], "trainable") == per_step(runs["shard"][rank], "trainable")


def test_a_checkpoint_with_replicated_frozen_weights_resumes_sharded(tmp_path, instruction_manifest):
    """Stage 2 saves its frozen vision encoder: replicated, as whole tensors rank 0 writes. A run on one
    process that shards everything resumes from them, and from the trained shards and optimizer state."""
    extra = ["--data.max_length", "256"]
    two = run("stage2", tmp_path, instruction_manifest, 2, 2, "two", *extra, frozen_placement="replicate")
    params = two[0]["end"]["params"]
    frozen = {name for name, info in params.items() if not info["trainable"]}
    assert any(n.startswith("vision.") for n in frozen) and not any(params[n]["sharded"] for n in frozen)
    assert all(info["sharded"] for info in params.values() if info["trainable"])
    one = run("stage2", tmp_path, instruction_manifest, 1, 4, "one", *extra)
    assert_resumed_from(one[0], two[0], steps=2)


def test_hsdp_gathers_frozen_weights_within_a_node_only(tmp_path, caption_manifest):
    """4 processes as 2 "nodes" of 2: under frozen_placement hsdp no frozen byte crosses a node, and the
    frozen LLM a rank receives is its node partner's half (1/2 of each weight, against 3/4 sharded over 4)."""
    runs = placement_runs(tmp_path, caption_manifest, "stage1", devices=4, node_size=2, placements=["shard", "hsdp"])
    assert_same_training(runs, "shard", "hsdp")
    llm = frozen_llm_bytes("stage1")
    for rank in range(4):
        sharded, hsdp = runs["shard"][rank], runs["hsdp"][rank]
        assert per_step(hsdp, "frozen_llm", "bytes_across_nodes") == [0, 0, 0]
        assert per_step(sharded, "frozen_llm", "bytes_across_nodes") == pytest.approx([llm * 2 * 2 / 4] * 3, rel=0.01)
        assert per_step(hsdp, "frozen_llm") == pytest.approx([llm * 2 / 2] * 3, rel=0.01)
        assert per_step(sharded, "frozen_llm") == pytest.approx([llm * 2 * 3 / 4] * 3, rel=0.01)


def test_frozen_placement_follows_memory():
    """auto: replicate what fits in half a device's memory, else keep all-gathers inside a node."""
    llama7b_bf16 = 13.5e9
    assert choose_frozen_placement(llama7b_bf16, device_memory=80e9, nodes=8) == "replicate"  # H100
    assert choose_frozen_placement(llama7b_bf16, device_memory=24e9, nodes=8) == "hsdp"
    assert choose_frozen_placement(llama7b_bf16, device_memory=24e9, nodes=1) == "shard"
    assert choose_frozen_placement(llama7b_bf16, device_memory=24e9, nodes=8, activation_allowance=0.4) == "replicate"


# bf16: the gradient of one LoRA matrix differs in its last bit (one bf16 rounding step, ~3e-5 of 8e-3).
@pytest.mark.parametrize(("param_dtype", "tolerance"), [(None, 0), (torch.bfloat16, 1e-4)])
def test_replicated_frozen_weights_are_plain_tensors_in_the_gather_dtype(
    one_process_mesh, tiny_config, tiny_tokenizer, param_dtype, tolerance
):
    """Replicated, the frozen weights are whole tensors outside FSDP, in the dtype FSDP would gather them
    in (LoRA's adapters in units of their own), and loss and gradients are those of sharding them."""
    sharded, replicated = stage2_model(tiny_config, tiny_tokenizer), stage2_model(tiny_config, tiny_tokenizer)
    assert shard_owl(sharded, one_process_mesh, param_dtype, "shard") == "shard"
    assert shard_owl(replicated, one_process_mesh, param_dtype, "auto") == "replicate"  # owl-tiny fits
    for name, param in replicated.named_parameters():
        assert isinstance(param, DTensor) == param.requires_grad, name
        assert param.requires_grad or param.dtype == (param_dtype or torch.float32), name
    assert mixed_units(replicated) == []
    ids = torch.tensor([[tiny_tokenizer.bos_token_id, tiny_tokenizer.convert_tokens_to_ids("<image>"), 97, 98, 99]])
    images = torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)
    losses = []
    for model in (sharded, replicated):
        torch.manual_seed(0)  # the same LoRA dropout
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=param_dtype is not None):  # as Lightning's bf16-mixed
            losses.append(model(ids, torch.ones_like(ids), ids, images, torch.tensor([1])).loss)
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for (name, param), other in zip(sharded.named_parameters(), replicated.parameters()):
        if param.requires_grad:
            torch.testing.assert_close(other.grad.full_tensor(), param.grad.full_tensor(), rtol=0, atol=tolerance, msg=name)


def test_placement_settings_are_checked(one_process_mesh, tiny_model):
    with pytest.raises(ValueError, match="frozen_placement 'fsdp': use one of auto, shard, hsdp, replicate"):
        AtomicModelParallelStrategy(frozen_placement="fsdp")
    with pytest.raises(ValueError, match="set the strategy's hsdp_shard_size to a divisor of 1"):
        shard_owl(tiny_model, one_process_mesh, frozen_placement="hsdp", processes_per_node=2)


def test_an_anyres_image_through_the_sharded_model_computes_as_the_whole_model(one_process_mesh, tiny_tokenizer):
    """The row separator is read after the connector's forward: its own unit gathers it (docs/high_resolution.md)."""
    model = stage2_model(get_config("owl-tiny-anyres"), tiny_tokenizer)
    whole = copy.deepcopy(model)
    shard_owl(model, one_process_mesh)
    ids = torch.tensor([[tiny_tokenizer.bos_token_id, tiny_tokenizer.convert_tokens_to_ids("<image>"), 97, 98, 99]])
    views = torch.randint(0, 255, (5, 3, 32, 32), dtype=torch.uint8)  # the global view and 2×2 tiles
    tiled = {"image_counts": torch.tensor([1]), "image_grids": torch.tensor([[2, 2]])}
    losses = [m(ids, torch.ones_like(ids), ids, views, **tiled).loss for m in (model, whole)]
    torch.testing.assert_close(losses[0], losses[1])
    losses[0].backward()
    assert model.abstractor.row_separator.weight.grad is not None
