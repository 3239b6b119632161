"""The vision encoder's CPU speed-up keeps the model as it was: 5×5 depthwise convolutions compute in
float32 under CPU autocast, with the same weights, names and results outside it."""

import copy

import timm
import torch

from owl_lightning.models.vision import float32_large_depthwise_on_cpu


def depthwise(model: torch.nn.Module, kernel: int) -> list[torch.nn.Conv2d]:
    return [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 and m.kernel_size == (kernel, kernel)
    ]


def test_large_depthwise_convolutions_compute_in_float32_under_cpu_autocast():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="").eval()
    reference = copy.deepcopy(model)
    assert float32_large_depthwise_on_cpu(model) == len(depthwise(reference, 5)) == 9
    assert all(type(a) is type(b) for a, b in zip(depthwise(model, 3), depthwise(reference, 3)))  # 3×3 left alone
    assert list(model.state_dict()) == list(reference.state_dict())

    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)  # no autocast: unchanged

    for conv, twin in zip(depthwise(model, 5), depthwise(reference, 5)):  # plain and TF-"same"-padded ones
        features = torch.randn(2, conv.in_channels, 9, 9).to(torch.bfloat16).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(features)
        assert out.dtype == torch.bfloat16
        with torch.no_grad():
            torch.testing.assert_close(out, twin(features.float()).to(torch.bfloat16), rtol=0, atol=0)
        out.float().sum().backward()
        assert conv.weight.grad.dtype == torch.float32 and features.grad.dtype == torch.bfloat16
