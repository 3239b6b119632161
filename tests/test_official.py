"""The official mPLUG-Owl v1 checkpoint layout → ours, without a download.

A tiny random state dict in their key names and shapes is converted, and our forward pass is
compared with a reference forward written here from the paper's equations (DESIGN §2) on those
same tensors, read by their names. The reference uses their LayerNorm eps (1e-5 in the abstractor's
norms, 1e-6 in the SwiGLU's and the vision tower's), as our abstractor does; timm's CLIP uses 1e-5.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers import LlamaConfig, LlamaForCausalLM

from owl_lightning.apps.official import convert_official
from owl_lightning.checkpoints import load_owl
from owl_lightning.cli import main
from owl_lightning.config import STAGE2, get_config
from owl_lightning.inference import OwlAssistant, Request
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import build_owl
from owl_lightning.train.system import OwlSystem

# Their layout at tiny sizes: a 32 px image in 8 px patches → 16 patches + CLS.
IMAGE, PATCH, VISION_WIDTH, VISION_HEADS, VISION_LAYERS = 32, 8, 32, 2, 2
QUERIES, ABSTRACTOR_HEADS, ABSTRACTOR_LAYERS, ABSTRACTOR_FFN = 4, 4, 2, 48
LLM = {
    "vocab_size": 259,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "bos_token_id": 257,
    "eos_token_id": 258,
    "pad_token_id": 256,
    "tie_word_embeddings": False,
}  # the byte tokenizer's 259 tokens; LLaMA-7B is untied too
TINY = {
    "vision.weights": None,
    "vision.image_size": IMAGE,
    "vision.timm_kwargs": {
        "img_size": IMAGE,
        "patch_size": PATCH,
        "embed_dim": VISION_WIDTH,
        "depth": VISION_LAYERS,
        "num_heads": VISION_HEADS,
        "mlp_ratio": 2.0,
    },
    "abstractor.num_queries": QUERIES,
    "abstractor.num_layers": ABSTRACTOR_LAYERS,
    "abstractor.hidden_size": VISION_WIDTH,
    "abstractor.num_heads": ABSTRACTOR_HEADS,
    "abstractor.intermediate_size": ABSTRACTOR_FFN,
    "llm.source": "random",
    "llm.tokenizer": "bytes",
    "llm.dtype": "float32",
    "llm.architecture": {"model_type": "llama", **LLM},
}


@pytest.fixture
def config():
    """owl-llama7b (their architecture: CLIP ViT with QuickGELU, abstractor as wide as the ViT) at tiny sizes."""
    return get_config("owl-llama7b", TINY)


def official_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors under their key names, in their shapes; LayerNorm scales away from 1 so every tensor matters."""
    gen = torch.Generator().manual_seed(1)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    def linear(name, out_features, in_features, bias=True):
        tensors = {f"{name}.weight": rand(out_features, in_features, scale=in_features**-0.5)}
        return tensors | ({f"{name}.bias": rand(out_features, scale=0.05)} if bias else {})

    def norm(name, width):
        return {f"{name}.weight": 1 + rand(width, scale=0.1), f"{name}.bias": rand(width, scale=0.1)}

    d, tokens = VISION_WIDTH, (IMAGE // PATCH) ** 2 + 1
    state = {
        "vision_model.embeddings.cls_token": rand(1, 1, d, scale=1.0),
        "vision_model.embeddings.position_embedding": rand(1, tokens, d, scale=1.0),
        "vision_model.embeddings.patch_embed.weight": rand(d, 3, PATCH, PATCH, scale=(3 * PATCH * PATCH) ** -0.5),
        **norm("vision_model.embeddings.pre_layernorm", d),
        **norm("vision_model.post_layernorm", d),
        "query_tokens": rand(1, QUERIES, d, scale=1.0),
        **linear("abstractor.visual_fc", LLM["hidden_size"], d),
        "abstractor.vit_eos": rand(1, 1, LLM["hidden_size"]),
    }
    for i in range(VISION_LAYERS):
        layer = f"vision_model.encoder.layers.{i}"
        state |= norm(f"{layer}.input_layernorm", d) | norm(f"{layer}.post_attention_layernorm", d)
        state |= linear(f"{layer}.self_attn.query_key_value", 3 * d, d) | linear(f"{layer}.self_attn.dense", d, d)
        state |= linear(f"{layer}.mlp.fc1", 2 * d, d) | linear(f"{layer}.mlp.fc2", d, 2 * d)
    for i in range(ABSTRACTOR_LAYERS):
        layer = f"abstractor.encoder.layers.{i}.crossattention"
        state |= norm(f"{layer}.norm1", d) | norm(f"{layer}.normk", d) | norm(f"{layer}.output.norm2", d)
        for name in ("query", "key", "value"):
            state |= linear(f"{layer}.attention.{name}", d, d)
        state |= linear(f"{layer}.output.out_proj", d, d)
        state |= linear(f"{layer}.output.mlp.w1", ABSTRACTOR_FFN, d) | linear(f"{layer}.output.mlp.w3", ABSTRACTOR_FFN, d)
        state |= linear(f"{layer}.output.mlp.w2", d, ABSTRACTOR_FFN) | norm(f"{layer}.output.mlp.ffn_ln", ABSTRACTOR_FFN)
    state |= {f"language_model.{k}": v for k, v in official_llm().state_dict().items()}
    # transformers of their time saved LLaMA's rotary buffer; it is recomputed, not converted.
    state["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return state


def official_llm(state=None) -> LlamaForCausalLM:
    llm = LlamaForCausalLM(LlamaConfig(**LLM)).eval()
    if state is not None:
        llm.load_state_dict(
            {k[len("language_model.") :]: v for k, v in state.items() if k.startswith("language_model.") and not k.endswith("inv_freq")}
        )
    return llm


# -- the reference forward, from the paper's equations, on their tensors ------------------------------------


def layer_norm(x, state, name, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def dense(x, state, name):
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


def attention(q, k, v, heads):
    """Softmax(q kᵀ / √d) v per head: ``[B, Lq, D]``, ``[B, Lk, D]`` → ``[B, Lq, D]``."""

    def split(x):  # [B, L, D] → [B, heads, L, D / heads]
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def reference_vision(state, pixels):
    """CLIP ViT: uint8 ``[B, 3, H, W]`` → ``[B, 1 + patches, D]``, every token after the final LayerNorm."""
    mean, std = (torch.tensor(c).view(1, 3, 1, 1) for c in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    x = F.conv2d((pixels / 255 - mean) / std, state["vision_model.embeddings.patch_embed.weight"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["vision_model.embeddings.cls_token"].expand(len(x), -1, -1), x], 1)
    x = layer_norm(x + state["vision_model.embeddings.position_embedding"], state, "vision_model.embeddings.pre_layernorm", 1e-6)
    for i in range(VISION_LAYERS):
        layer = f"vision_model.encoder.layers.{i}"
        h = layer_norm(x, state, f"{layer}.input_layernorm", 1e-6)
        # Their fused projection: for each head, its query, key and value rows in turn.
        q, k, v = dense(h, state, f"{layer}.self_attn.query_key_value").unflatten(-1, (VISION_HEADS, 3, -1)).unbind(-2)
        x = x + dense(attention(q.flatten(-2), k.flatten(-2), v.flatten(-2), VISION_HEADS), state, f"{layer}.self_attn.dense")
        h = dense(layer_norm(x, state, f"{layer}.post_attention_layernorm", 1e-6), state, f"{layer}.mlp.fc1")
        x = x + dense(h * torch.sigmoid(1.702 * h), state, f"{layer}.mlp.fc2")  # QuickGELU
    return layer_norm(x, state, "vision_model.post_layernorm", 1e-6)


def reference_abstractor(state, features):
    """Queries layer-normed; keys/values = [queries; visual tokens], layer-normed; residual on the normed
    queries; SwiGLU with an inner LayerNorm; projection to the LLM width; end-of-image token appended."""
    x = state["query_tokens"].expand(len(features), -1, -1)
    for i in range(ABSTRACTOR_LAYERS):
        layer = f"abstractor.encoder.layers.{i}.crossattention"
        q = layer_norm(x, state, f"{layer}.norm1", 1e-5)
        kv = torch.cat([q, layer_norm(features, state, f"{layer}.normk", 1e-5)], 1)
        attended = attention(
            dense(q, state, f"{layer}.attention.query"),
            dense(kv, state, f"{layer}.attention.key"),
            dense(kv, state, f"{layer}.attention.value"),
            ABSTRACTOR_HEADS,
        )
        x = q + dense(attended, state, f"{layer}.output.out_proj")
        h = layer_norm(x, state, f"{layer}.output.norm2", 1e-5)
        h = F.silu(dense(h, state, f"{layer}.output.mlp.w1")) * dense(h, state, f"{layer}.output.mlp.w3")
        x = x + dense(layer_norm(h, state, f"{layer}.output.mlp.ffn_ln", 1e-6), state, f"{layer}.output.mlp.w2")
    tokens = dense(x, state, "abstractor.visual_fc")
    return torch.cat([tokens, state["abstractor.vit_eos"].expand(len(tokens), -1, -1)], 1)


def random_pixels(count=2):
    return torch.randint(0, 256, (count, 3, IMAGE, IMAGE), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)


def converted_model(config, state):
    tokenizer = load_tokenizer(config.llm)
    model = build_owl(config, pretrained=False, tokenizer=tokenizer).eval()
    model.load_state_dict(convert_official(state, config, tokenizer))  # strict: every tensor has its place
    return model, tokenizer


# -- tests -------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_converted_model_computes_the_papers_equations(config):
    state = official_state_dict()
    model, tokenizer = converted_model(config, state)
    pixels = random_pixels()

    features = model.vision(pixels)
    expected_features = reference_vision(state, pixels.float())
    assert features.shape == (2, (IMAGE // PATCH) ** 2 + 1, VISION_WIDTH)
    torch.testing.assert_close(features, expected_features, atol=1e-4, rtol=1e-4)
    visual = model.abstractor(features)
    expected_visual = reference_abstractor(state, expected_features)
    assert visual.shape == (2, QUERIES + 1, LLM["hidden_size"])
    torch.testing.assert_close(visual, expected_visual, atol=1e-4, rtol=1e-4)

    # End to end: their LLM on [text; visual tokens; text] gives our logits (ours have one more column, <image>).
    before, after = [tokenizer.bos_token_id, *tokenizer.encode("Human: ")], tokenizer.encode("\nAI: a red")
    ids = torch.tensor([before + [model.image_token_id] + after])
    embeds, mask, _ = model.embed(ids, torch.ones_like(ids), pixels[:1])
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
    reference = official_llm(state)
    text = reference.get_input_embeddings()
    expected_embeds = torch.cat([text(torch.tensor([before])), expected_visual[:1], text(torch.tensor([after]))], 1)
    expected_logits = reference(inputs_embeds=expected_embeds).logits
    assert logits.shape[-1] == LLM["vocab_size"] + 1
    torch.testing.assert_close(logits[..., :-1], expected_logits, atol=1e-4, rtol=1e-4)
    # The added <image> row is the mean of theirs, as build_owl adds it.
    embedding = model.llm.get_input_embeddings().weight
    torch.testing.assert_close(embedding[-1], state["language_model.model.embed_tokens.weight"].mean(0))


@pytest.mark.parametrize("base_suffix", ["weight", "base_layer.weight"])  # peft of their time, and today's
def test_peft_saves_are_merged_into_the_llm(config, base_suffix):
    plain = official_state_dict()
    lora, state = {}, {}
    for key, tensor in plain.items():
        module = key.removesuffix(".weight")
        if module.endswith(("q_proj", "v_proj")) and key.endswith(".weight"):
            lora[module] = (torch.randn(8, tensor.shape[1]), torch.randn(tensor.shape[0], 8))
            state[f"base_model.model.{module}.{base_suffix}"] = tensor
            state[f"base_model.model.{module}.lora_A.default.weight"] = lora[module][0]
            state[f"base_model.model.{module}.lora_B.default.weight"] = lora[module][1]
        else:
            state[f"base_model.model.{key}"] = tensor
    converted = convert_official(state, config, load_tokenizer(config.llm))
    assert len(lora) == 2 * LLM["num_hidden_layers"]
    scale = config.lora.alpha / 8
    for module, (down, up) in lora.items():
        ours = "llm." + module.removeprefix("language_model.") + ".weight"
        torch.testing.assert_close(converted[ours], plain[f"{module}.weight"] + scale * up @ down)


def test_unplaced_missing_and_misfit_tensors_are_named(config):
    tokenizer = load_tokenizer(config.llm)
    extra = official_state_dict() | {"vision_model.embeddings.class_embedding": torch.zeros(VISION_WIDTH)}
    with pytest.raises(ValueError, match=r"no place in owl-llama7b: vision_model\.embeddings\.class_embedding"):
        convert_official(extra, config, tokenizer)
    missing = official_state_dict()
    del missing["abstractor.vit_eos"]
    with pytest.raises(ValueError, match=r"none in the official checkpoint: abstractor\.end_token"):
        convert_official(missing, config, tokenizer)
    misfit = official_state_dict() | {"query_tokens": torch.zeros(1, QUERIES + 1, VISION_WIDTH)}
    with pytest.raises(ValueError, match=r"official query_tokens \(1, 5, 32\) does not fit abstractor\.queries \(1, 4, 32\)"):
        convert_official(misfit, config, tokenizer)
    adapter_only = {
        "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64),
        "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 8),
    }
    with pytest.raises(ValueError, match=r"pass the full model together with the adapter"):
        convert_official(adapter_only, config, tokenizer)


def test_convert_official_cli_writes_an_export_for_chat_and_stage2(tmp_path):
    state = official_state_dict()
    (tmp_path / "official").mkdir()
    torch.save(state, tmp_path / "official" / "pytorch_model.bin")
    out = tmp_path / "owl"
    main(["convert-official", "--src", str(tmp_path / "official"), "--out", str(out), "--overrides", json.dumps(TINY)])

    pixels = random_pixels()
    model = load_owl(out)
    with torch.no_grad():
        expected = reference_abstractor(state, reference_vision(state, pixels.float()))
        torch.testing.assert_close(model.encode_images(pixels), expected, atol=1e-4, rtol=1e-4)
    assistant = OwlAssistant.from_checkpoint(out, precision="fp32")
    assert assistant.template.system_prompt.startswith("The following is a conversation")  # the official template
    assert isinstance(assistant.answer([Request.single("What is it?", [Image.new("RGB", (IMAGE, IMAGE))])], 4)[0], str)

    # Stage 2 starts from it: the export's llm/ as the base LLM, vision and abstractor through init_from.
    config = get_config("owl-llama7b", TINY | {"llm.source": str(out / "llm"), "llm.tokenizer": None})
    system = OwlSystem(config=config, recipe=STAGE2, init_from=str(out))
    system.configure_model()
    torch.testing.assert_close(system.model.vision.model.pos_embed, state["vision_model.embeddings.position_embedding"])
    torch.testing.assert_close(system.model.abstractor.end_token, state["abstractor.vit_eos"])
    q_proj = system.model.llm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(q_proj, state["language_model.model.layers.0.self_attn.q_proj.weight"])
