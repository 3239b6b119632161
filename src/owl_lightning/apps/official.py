"""The official mPLUG-Owl v1 weights (X-PLUG/mPLUG-Owl, Hugging Face layout) → an ``owl-llama7b`` export.

Their model is ``vision_model`` (their CLIP ViT-L/14), ``query_tokens``, ``abstractor`` and
``language_model`` (a Hugging Face LLaMA); ours is timm's CLIP ViT, our abstractor and the same
LLaMA. Every tensor maps onto one of ours by name (``_RENAMES``); three need more than a new name:

- the vision tower's fused ``query_key_value`` orders its output rows per head, ``[heads, 3, head_dim]``
  (their attention reshapes it so); timm's ``qkv`` orders them q, k, v first, ``[3, heads, head_dim]``;
- the LLM's embeddings and output layer gain the ``<image>`` row (their text marks images with
  negative ids instead), the mean of the other rows, as ``build_owl`` adds it;
- peft saves (``base_model.model.`` prefix, ``lora_A``/``lora_B`` with or without ``.default``) are
  merged into their base weights, ``W + alpha / r · B A``, with ``alpha`` from the config's ``lora``
  section (their release used 32, as owl-llama7b does).

LayerNorm eps: our abstractor uses theirs (``abstractor.layer_norm_eps`` 1e-5 in the query, context
and feed-forward norms, ``inner_norm_eps`` 1e-6 in the SwiGLU). Their vision LayerNorms use 1e-6,
timm's CLIP 1e-5: on the encoder's unit-scale activations that is ~1e-5.

``write_official_export`` writes the result as an exported folder (``owl_lightning.export``): chat
with it, or start stage 2 from it (``--model.init_from DIR`` with ``llm.source`` set to ``DIR/llm``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from owl_lightning.config import OwlConfig, get_config
from owl_lightning.export import write_export
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import OwlModel, build_owl

# (pattern at the start of their key, our replacement); the rest of the key (weight/bias) carries over.
_RENAMES = [
    (re.compile(pattern), replacement)
    for pattern, replacement in [
        (r"vision_model\.embeddings\.cls_token$", "vision.model.cls_token"),
        (r"vision_model\.embeddings\.position_embedding$", "vision.model.pos_embed"),
        (r"vision_model\.embeddings\.patch_embed\.", "vision.model.patch_embed.proj."),
        (r"vision_model\.embeddings\.pre_layernorm\.", "vision.model.norm_pre."),
        (r"vision_model\.encoder\.layers\.(\d+)\.input_layernorm\.", r"vision.model.blocks.\1.norm1."),
        (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.query_key_value\.", r"vision.model.blocks.\1.attn.qkv."),
        (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.dense\.", r"vision.model.blocks.\1.attn.proj."),
        (r"vision_model\.encoder\.layers\.(\d+)\.post_attention_layernorm\.", r"vision.model.blocks.\1.norm2."),
        (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"vision.model.blocks.\1.mlp.\2."),
        (r"vision_model\.post_layernorm\.", "vision.model.norm."),
        (r"query_tokens$", "abstractor.queries"),
        (r"abstractor\.encoder\.layers\.(\d+)\.crossattention\.norm1\.", r"abstractor.layers.\1.query_norm."),
        (r"abstractor\.encoder\.layers\.(\d+)\.crossattention\.normk\.", r"abstractor.layers.\1.context_norm."),
        (r"abstractor\.encoder\.layers\.(\d+)\.crossattention\.attention\.query\.", r"abstractor.layers.\1.q_proj."),
        (r"abstractor\.encoder\.layers\.(\d+)\.crossattention\.attention\.key\.", r"abstractor.layers.\1.k_proj."),
        (r"abstractor\.encoder\.layers\.(\d+)\.crossattention\.attention\.value\.", r"abstractor.layers.\1.v_proj."),
        (r"abstractor\.encoder\.layers\.(\d+)\.crossattention\.output\.out_proj\.", r"abstractor.layers.\1.out_proj."),
        (r"abstractor\.encoder\.layers\.(\d+)\.crossattention\.output\.norm2\.", r"abstractor.layers.\1.ffn_norm."),
        (r"abstractor\.encoder\.layers\.(\d+)\.crossattention\.output\.mlp\.(w1|w2|w3)\.", r"abstractor.layers.\1.ffn.\2."),
        (r"abstractor\.encoder\.layers\.(\d+)\.crossattention\.output\.mlp\.ffn_ln\.", r"abstractor.layers.\1.ffn.inner_norm."),
        (r"abstractor\.visual_fc\.", "abstractor.proj."),
        (r"abstractor\.vit_eos$", "abstractor.end_token"),
        (r"language_model\.", "llm."),
    ]
]
_QKV = re.compile(r"vision\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])(\.default)?\.weight")
# Buffers older transformers versions saved with LLaMA; the model recomputes them.
_RECOMPUTED = ("rotary_emb.inv_freq",)
_TEMPORAL_EMBEDDING = "abstractor.temporal_embedding.weight"  # ours alone (docs/video.md): no official tensor


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an official checkpoint: a folder holding ``*.safetensors`` shards (else
    ``pytorch_model*.bin`` shards and/or a peft ``adapter_model.bin``), or one such file."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin")) + sorted(path.glob("adapter_model.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors, pytorch_model*.bin or adapter_model.bin in {path}; pass the official model folder")
    state = {}
    for file in files:
        state.update(load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu", weights_only=True))
    return state


def convert_official(
    source: str | Path | dict[str, torch.Tensor],
    config: OwlConfig | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, torch.Tensor]:
    """Official tensors (a folder or file, see :func:`read_official`, or their state dict) → the
    ``OwlModel.state_dict()`` of ``config`` (default ``owl-llama7b``), every tensor in our dtype.

    ``tokenizer`` (with ``<image>``) sets the vocabulary size; without one, ``<image>`` is one row more
    than their LLM has. Raises ``ValueError`` naming every tensor that has no place in ours, every one
    of ours left without a tensor, and every shape that does not fit.
    """
    config = config or get_config("owl-llama7b")
    state = source if isinstance(source, dict) else read_official(source)
    with torch.device("meta"):  # shapes and dtypes only: nothing is allocated
        target = build_owl(config, pretrained=False, tokenizer=tokenizer)
    expected = target.state_dict()
    vocab_keys = _vocabulary_keys(target)
    converted, unplaced = {}, []
    for key, tensor in _merge_lora(state, config.lora.alpha).items():
        if key.endswith(_RECOMPUTED):
            continue
        ours = _our_name(key)
        if ours not in expected:
            unplaced.append(key)
            continue
        rows = expected[ours].shape[0]
        if ours in vocab_keys and tensor.shape[0] < rows:
            mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
            tensor = torch.cat([tensor, mean.expand(rows - tensor.shape[0], -1)])
        if tensor.shape != expected[ours].shape:
            raise ValueError(
                f"official {key} {tuple(tensor.shape)} does not fit {ours} {tuple(expected[ours].shape)} of "
                f"{config.name}; pick the config (and overrides) with the checkpoint's sizes"
            )
        qkv = _QKV.fullmatch(ours)
        if qkv:
            heads = target.vision.model.blocks[int(qkv[1])].attn.num_heads
            tensor = tensor.unflatten(0, (heads, 3, -1)).transpose(0, 1).flatten(0, 2)
        converted[ours] = tensor.to(expected[ours].dtype).contiguous()
    if unplaced:
        raise ValueError(
            f"{len(unplaced)} official tensors have no place in {config.name}: {', '.join(unplaced[:8])}"
            f"{' ...' if len(unplaced) > 8 else ''}; is this an mPLUG-Owl v1 checkpoint of the config's sizes?"
        )
    # The released v1 model reads images only: the video frames' temporal embedding starts at zero, as in a
    # freshly built model (docs/video.md), i.e. frames are read as the image model reads them.
    temporal = expected[_TEMPORAL_EMBEDDING]
    converted[_TEMPORAL_EMBEDDING] = torch.zeros(temporal.shape, dtype=temporal.dtype)
    missing = [k for k in expected if k not in converted]
    if missing:
        raise ValueError(
            f"{len(missing)} tensors of {config.name} have none in the official checkpoint: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; pass every shard (and the full "
            f"model next to a LoRA adapter)"
        )
    return converted


def write_official_export(sources: list[str | Path], out: str | Path, config: OwlConfig | None = None) -> Path:
    """Convert official checkpoint folders/files (read in order; a later one wins, e.g. the full model
    then a LoRA adapter) and write them as an exported folder with the default owl template."""
    config = config or get_config("owl-llama7b")
    tokenizer = load_tokenizer(config.llm)
    state = {}
    for source in sources:
        state.update(read_official(source))
    converted = convert_official(state, config, tokenizer)
    with torch.device("meta"):
        model = build_owl(config, pretrained=False, tokenizer=tokenizer)
    # assign: the converted tensors become the model's own, so 7B weights are held once, not twice.
    model.load_state_dict(converted, assign=True)
    return write_export(model, tokenizer, {"template": "owl", "system_prompt": None}, out)


def _our_name(key: str) -> str | None:
    for pattern, replacement in _RENAMES:
        match = pattern.match(key)
        if match:
            return match.expand(replacement) + key[match.end() :]
    return None


def _merge_lora(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Drop peft's key prefixes and fold every ``lora_A``/``lora_B`` pair into its base weight."""
    plain, pairs = {}, {}
    for key, tensor in state.items():
        key = key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        lora = _LORA.fullmatch(key)
        if lora:
            pairs.setdefault(lora["module"], {})[lora["side"]] = tensor
        else:
            plain[key] = tensor
    for module, pair in pairs.items():
        base = f"{module}.weight"
        if set(pair) != {"A", "B"} or base not in plain:
            raise ValueError(
                f"LoRA of {module} needs lora_A, lora_B and the base weight {base}; pass the full model "
                f"together with the adapter (--src MODEL_DIR --src ADAPTER_DIR)"
            )
        down, up = pair["A"].float(), pair["B"].float()  # [r, in], [out, r]
        plain[base] = (plain[base].float() + alpha / down.shape[0] * up @ down).to(plain[base].dtype)
    return plain


def _vocabulary_keys(model: OwlModel) -> set[str]:
    """State-dict keys of the LLM's input and output embeddings (one or two keys when tied)."""
    embeddings = {id(layer.weight) for layer in (model.llm.get_input_embeddings(), model.llm.get_output_embeddings()) if layer is not None}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in embeddings}
