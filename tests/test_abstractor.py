import torch

from owl_lightning.config import AbstractorConfig
from owl_lightning.models.abstractor import VisualAbstractor


def make(vision_width=48):
    cfg = AbstractorConfig(num_queries=5, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64)
    return VisualAbstractor(cfg, vision_width=vision_width, llm_width=24)


def test_output_shape_is_queries_plus_end_token_in_llm_width():
    abstractor = make()
    out = abstractor(torch.randn(3, 17, 48))
    assert out.shape == (3, 6, 24)
    assert abstractor.num_tokens == 6


def test_any_number_of_visual_features():
    abstractor = make().eval()
    assert abstractor(torch.randn(2, 1, 48)).shape == abstractor(torch.randn(2, 300, 48)).shape


def test_end_token_is_the_same_learned_vector_for_every_image():
    abstractor = make()
    out = abstractor(torch.randn(2, 7, 48))
    torch.testing.assert_close(out[0, -1], abstractor.end_token[0, 0])
    torch.testing.assert_close(out[1, -1], abstractor.end_token[0, 0])


def test_gradients_reach_queries_projection_and_end_token():
    abstractor = make()
    abstractor(torch.randn(2, 9, 48)).pow(2).sum().backward()
    for name in ("queries", "end_token", "proj.weight", "input_proj.weight", "layers.0.ffn.inner_norm.weight"):
        grad = dict(abstractor.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_no_input_projection_when_widths_match():
    abstractor = make(vision_width=32)
    assert isinstance(abstractor.input_proj, torch.nn.Identity)


def test_images_are_summarised_independently():
    abstractor = make().eval()
    features = torch.randn(2, 9, 48)
    together = abstractor(features)
    alone = abstractor(features[1:])
    torch.testing.assert_close(together[1:], alone)
