import pytest
import torch

from owl_lightning.config import AbstractorConfig
from owl_lightning.models.abstractor import VisualAbstractor, grid_positions


def make(vision_width=48, feature_positions="none"):
    cfg = AbstractorConfig(
        num_queries=5, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, feature_positions=feature_positions
    )
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


@pytest.mark.parametrize("num_features", [16, 17])  # a CNN's 4 × 4 map; a ViT's class token + 4 × 4 patches
def test_feature_positions_make_the_features_order_visible(num_features):
    torch.manual_seed(0)
    features = torch.randn(2, num_features, 48)
    order = torch.randperm(num_features)
    if num_features == 17:  # the class token keeps its place
        order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(16)])
    plain = make().eval()
    placed = make(feature_positions="sincos2d").eval()
    placed.load_state_dict(plain.state_dict())  # the positions add no weights: checkpoints load either way
    torch.testing.assert_close(plain(features[:, order]), plain(features))  # cross-attention alone is order-blind
    assert not torch.allclose(placed(features[:, order]), placed(features), atol=1e-4)


def test_grid_positions_encode_row_and_column():
    positions = grid_positions(1 + 9, 32)  # class token + 3 × 3, row-major
    assert positions.shape == (10, 32)
    assert positions[0].abs().sum() == 0
    grid = positions[1:].view(3, 3, 32)
    torch.testing.assert_close(grid[:, 0, :16], grid[:, 2, :16])  # the first half encodes the row only
    torch.testing.assert_close(grid[0, :, 16:], grid[2, :, 16:])  # the second half the column only
    assert not torch.allclose(grid[0, 0], grid[1, 0]) and not torch.allclose(grid[0, 0], grid[0, 1])


def test_grid_positions_refuse_a_feature_count_that_is_no_grid():
    with pytest.raises(ValueError, match="feature_positions='none'"):
        grid_positions(12, 32)
