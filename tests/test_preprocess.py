"""The data workers' image preprocessing equals timm's eval transform for the model (up to rounding)."""

import pytest
import torch
from PIL import Image, ImageDraw
from timm.data import create_transform
from torchvision import transforms

from owl_lightning.config import get_config
from owl_lightning.models import vision
from owl_lightning.models.vision import TensorPreprocess, image_transform, vision_data_config


def photos() -> dict[str, Image.Image]:
    """Real photos in landscape and portrait, and a flat-colour drawing like the embedded easy-VQA images."""
    import skimage.data

    images = {}
    for name in ("chelsea", "coffee", "astronaut"):
        photo = Image.fromarray(getattr(skimage.data, name)())
        images[name], images[f"{name}-portrait"] = photo, photo.transpose(Image.Transpose.TRANSPOSE)
    drawing = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(drawing).ellipse((12, 20, 50, 44), fill=(30, 90, 200))
    images["shape"] = drawing
    return images


@pytest.mark.parametrize("model_name", ["owl-tiny", "owl-smol", "owl-llama7b"])
def test_tensor_preprocess_matches_timm_pil_transform(model_name):
    cfg = get_config(model_name).vision
    ours = image_transform(cfg)
    assert isinstance(ours, TensorPreprocess)
    timm_transform = create_transform(**vision_data_config(cfg), is_training=False, use_prefetcher=True)
    for name, image in photos().items():
        expected, got = timm_transform(image), ours(image)
        assert got.dtype == torch.uint8 and got.shape == expected.shape, name
        difference = (got.int() - expected.int()).abs()
        # Rounding where a bicubic overshoot is clipped, not a different filter or crop.
        assert difference.max() <= 2 and (difference > 0).float().mean() < 0.01, (name, difference.max())


def test_transform_of_another_shape_runs_as_timm_built_it(monkeypatch):
    built = transforms.Compose([transforms.Resize(40), transforms.CenterCrop(32), transforms.PILToTensor(), transforms.Grayscale(3)])
    monkeypatch.setattr(vision, "create_transform", lambda **_: built)
    assert image_transform(get_config("owl-tiny").vision) is built
