"""Exported folders: loadable by transformers, peft and timm on their own, and back into owl_lightning
with the same greedy answers as the checkpoint they came from.

owl-tiny's base LLM is random and, like every base LLM, left out of checkpoints: the same seed
before two loads of one checkpoint rebuilds the same model.
"""

import json

import pytest
import timm
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from owl_lightning.checkpoints import export_checkpoint, is_base_llm_weight, load_owl
from owl_lightning.cli import main
from owl_lightning.config import CHECKPOINT_PREFIX as PREFIX
from owl_lightning.config import IMAGE_TOKEN, AbstractorConfig, get_config
from owl_lightning.data.template import Turn
from owl_lightning.inference import ChatSession, OwlAssistant, Request
from owl_lightning.models.abstractor import VisualAbstractor
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import build_owl
from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule
from tests.helpers import COLOURS, fit, tiny_system

# owl-tiny with 10x the LLM's random-init scale: its greedy answers then differ with the prompt and the
# image (at the default scale every answer is blanks), so equal answers mean something.
VARIED = {"llm.architecture": {**get_config("owl-tiny").llm.architecture, "initializer_range": 0.2}}


def square(colour):
    return Image.new("RGB", (32, 32), COLOURS[colour])


def stage2_checkpoint(path, system_prompt):
    """An owl-tiny stage-2 checkpoint as the training systems save it (no base LLM), its LoRA non-zero."""
    config = get_config("owl-tiny", VARIED)
    model = build_owl(config, tokenizer=load_tokenizer(config.llm))
    model.add_lora(config.lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # zero at init: the adapter would change nothing
                param.normal_(std=0.05)
    state = {PREFIX + k: v for k, v in model.state_dict().items() if not is_base_llm_weight(PREFIX + k)}
    torch.save(
        {
            "state_dict": state,
            "owl_config": config.to_dict(),
            "datamodule_hyper_parameters": {"template": "owl", "system_prompt": system_prompt},
        },
        path,
    )
    return path


@torch.no_grad()
def test_exported_parts_load_in_transformers_peft_and_timm(tmp_path):
    ckpt = stage2_checkpoint(tmp_path / "stage2.ckpt", system_prompt=None)
    torch.manual_seed(0)
    original = load_owl(ckpt)
    torch.manual_seed(0)
    out = export_checkpoint(ckpt, tmp_path / "export")
    manifest = json.loads((out / "owl.json").read_text())
    assert manifest["image_token"] == IMAGE_TOKEN and manifest["visual_tokens_per_image"] == 5

    # The LLM with LoRA merged, and its tokenizer with <image> as one token.
    tokenizer = AutoTokenizer.from_pretrained(out / "llm")
    assert tokenizer(f"a{IMAGE_TOKEN}b", add_special_tokens=False)["input_ids"][1] == manifest["image_token_id"] == original.image_token_id
    ids = torch.tensor([tokenizer.encode("Human: what is an owl?\nAI: ")])
    expected = original.llm(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(out / "llm")
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)

    # The adapter alone, unmerged, on the base LLM it was trained on.
    base = original.llm.unload()
    assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)  # so the adapter matters
    adapted = PeftModel.from_pretrained(base, out / "lora")
    torch.testing.assert_close(adapted(input_ids=ids).logits, expected)

    # The vision encoder in plain timm, and the abstractor from its config.
    vision = manifest["owl_config"]["vision"]
    encoder = timm.create_model(vision["timm_name"], num_classes=0, global_pool="", **vision["timm_kwargs"])
    encoder.load_state_dict(load_file(out / "vision.safetensors"))
    images = torch.randn(2, 3, 32, 32)
    features = encoder.eval().forward_features(images)
    torch.testing.assert_close(features, original.vision.model.forward_features(images))
    abstractor = VisualAbstractor(AbstractorConfig(**manifest["owl_config"]["abstractor"]), encoder.num_features, merged.config.hidden_size)
    state = load_file(out / "abstractor.safetensors")
    # Beside the abstractor's own tensors, its slot holds the video frames' temporal embedding (docs/video.md).
    assert state.pop("temporal_embedding.weight").shape == (manifest["owl_config"]["video"]["num_frames"], encoder.num_features)
    abstractor.load_state_dict(state)
    torch.testing.assert_close(abstractor.eval()(features), original.abstractor(features))


def test_export_replaces_an_export_but_no_other_folder(tmp_path):
    ckpt = stage2_checkpoint(tmp_path / "stage2.ckpt", system_prompt=None)
    out = export_checkpoint(ckpt, tmp_path / "export")
    (out / "stale.txt").write_text("from an earlier export")
    export_checkpoint(ckpt, out)
    assert not (out / "stale.txt").exists() and (out / "lora" / "adapter_config.json").is_file()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not an owl_lightning export"):
        export_checkpoint(ckpt, precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_stage1_stage2_export_reload_chat(tmp_path, caption_manifest, instruction_manifest):
    stage1 = tiny_system("stage1", config_overrides=VARIED, lr=1e-2, warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=stage1.processor, batch_size=4, num_workers=0)
    trainer = fit(stage1, data, tmp_path / "stage1", steps=1)
    trainer.save_checkpoint(tmp_path / "stage1.ckpt")
    stage2 = tiny_system("stage2", config_overrides=VARIED, lr=1e-2, warmup_steps=0, init_from=str(tmp_path / "stage1.ckpt"))
    data = InstructionDataModule(
        manifest=str(instruction_manifest),
        processor=stage2.processor,
        batch_size=4,
        num_workers=0,
        max_length=256,
        system_prompt="You are a terse owl.",
    )
    trainer = fit(stage2, data, tmp_path / "stage2", steps=1)
    ckpt = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(ckpt)

    torch.manual_seed(0)
    original = OwlAssistant.from_checkpoint(ckpt, precision="fp32")
    torch.manual_seed(0)
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")])
    exported = OwlAssistant.from_checkpoint(tmp_path / "export", precision="fp32")

    assert exported.template.system_prompt == original.template.system_prompt == "You are a terse owl."
    requests = [
        Request.single("What colour is the square?", [square("red")]),
        Request.single("What colour is the square?", [square("blue")]),
        Request.single("Say the number 3."),
        Request([Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "<image>\nAnd this?")], [square("blue")]),
    ]
    answers = exported.answer(requests, max_new_tokens=12)
    assert answers == original.answer(requests, max_new_tokens=12)
    assert len(set(answers)) == len(requests)  # the image and the prompt change the answer
    session = ChatSession(exported, [square("green")], max_new_tokens=6)
    first, second = session.ask("What colour is it?"), session.ask("Are you sure?")
    assert isinstance(first, str) and isinstance(second, str) and len(session.turns) == 4


def test_eval_reads_an_export_as_its_own_run(tmp_path):
    from owl_lightning.checkpoints import resolve_checkpoint, run_folder

    out = export_checkpoint(stage2_checkpoint(tmp_path / "stage2.ckpt", system_prompt=None), tmp_path / "export")
    assert (run_folder(out), resolve_checkpoint(out)) == (out, out)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert (run_folder(run), resolve_checkpoint(run)) == (run, run / "checkpoints" / "last.ckpt")
    assert run_folder(run / "checkpoints" / "last.ckpt") == run
