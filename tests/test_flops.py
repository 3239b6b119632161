"""FLOP counting (owl_lightning.train.flops) against the config's shapes and against torch's FlopCounterMode."""

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from owl_lightning.config import IGNORE_INDEX, TrainRecipe
from owl_lightning.models.owl import build_owl
from owl_lightning.train import callbacks
from owl_lightning.train.callbacks import StepThroughput
from owl_lightning.train.datamodules import CaptionDataModule
from owl_lightning.train.flops import StepFlops, measure_matmul_flops, sequence_lengths
from tests.helpers import caption_batch, fit, tiny_system


def tiny(tiny_config, tiny_tokenizer, vision=True, abstractor=True, llm=False, lora=False):
    torch.manual_seed(0)
    model = build_owl(tiny_config, tokenizer=tiny_tokenizer)
    frozen_or = {True: "train", False: "frozen"}
    model.apply_recipe(
        TrainRecipe(vision=frozen_or[vision], abstractor=frozen_or[abstractor], llm="lora" if lora else "full" if llm else "frozen")
    )
    return model


def forward(model, batch):
    return model(batch["input_ids"], batch["sample_ids"], batch["labels"], batch["images"], batch["image_counts"])


def supervised(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    # Model FLOPs: gradients to both operands of QKᵀ and of the weighted sum (2x forward); torch's own
    # formula adds the flash kernel's recompute of the scores, which is hardware work.
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def measured(model, batch) -> int:
    """What torch counts for one forward + backward: products, convolutions, attention."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        forward(model, batch).loss.backward()
    return counter.get_total_flops()


def test_llm_terms_follow_the_config(tiny_config, tiny_tokenizer):
    arch = tiny_config.llm.architecture
    d, inner, layers, heads, kv_heads = (
        arch[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    )
    kv = kv_heads * d // heads
    matrices = layers * (2 * d * d + 2 * d * kv + 3 * d * inner)  # q, o; k, v; gate, up, down
    model = tiny(tiny_config, tiny_tokenizer)
    flops = StepFlops.of(model)
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    # Frozen LLM in stage 1: forward and input gradient, no weight gradient.
    assert flops.per_token == 2 * matrices * 2
    assert flops.per_causal_pair == 2 * 2 * layers * d * 3
    assert flops.per_supervised_token == 2 * d * vocab * 2

    lora = StepFlops.of(tiny(tiny_config, tiny_tokenizer, vision=False, lora=True))
    r = tiny_config.lora.r
    adapters = layers * (r * (d + d) + r * (d + kv))  # A and B on q_proj and v_proj
    assert lora.per_token == 2 * matrices * 2 + 2 * adapters * 3


def test_a_model_built_on_meta_counts_the_same(tiny_config, tiny_tokenizer):
    """FSDP's ranks other than 0 build the model on the meta device and count its FLOPs there."""
    with torch.device("meta"):
        on_meta = StepFlops.of(build_owl(tiny_config, pretrained=False, tokenizer=tiny_tokenizer))
    assert on_meta == StepFlops.of(build_owl(tiny_config, tokenizer=tiny_tokenizer))


def test_frozen_llm_backward_counts_no_weight_gradients(tiny_config, tiny_tokenizer):
    """Training the LLM's weights adds exactly their weight gradients, as torch counts them."""
    batch = caption_batch(tiny_tokenizer)
    frozen = tiny(tiny_config, tiny_tokenizer, llm=False)
    trained = tiny(tiny_config, tiny_tokenizer, llm=True)
    counted = StepFlops.of(trained).step(batch, 20) - StepFlops.of(frozen).step(batch, 20)
    assert counted == measured(trained, batch) - measured(frozen, batch)


@pytest.mark.parametrize("connector", ["abstractor", "mlp"])
def test_step_matches_what_torch_counts(tiny_config, tiny_tokenizer, connector):
    """Against torch's count of one real step (its CPU attention kernels counted too), the model
    differs by exactly two terms it means to: causal attention counts each token's prefix, where
    torch counts the whole square; and the first vision layer's input gradient, which autograd skips
    (pixels need none), is counted. Left over: the rotary embedding's small product (< 0.01%). The
    MLP connector gives the LLM every encoder token (17 a 32 px image on owl-tiny, against 5)."""
    batch = caption_batch(tiny_tokenizer)
    model = tiny(replace(tiny_config, connector=connector), tiny_tokenizer)
    assert model.visual_tokens_per_image == {"abstractor": 5, "mlp": 17}[connector]
    flops = StepFlops.of(model)
    length = float(sequence_lengths(batch, flops.visual_tokens_per_image, flops.image_token_id).sum())
    square_minus_prefix = (length * length - length * (length + 1) / 2) * flops.per_causal_pair
    patch_embed = model.vision.model.patch_embed.proj
    first_input_gradient = 2 * patch_embed.weight.numel() * (32 // patch_embed.stride[0]) ** 2
    ours = flops.step(batch, supervised(batch)) + square_minus_prefix - first_input_gradient
    torch.testing.assert_close(ours, float(measured(model, batch)), rtol=1e-4, atol=0)


def test_only_real_tokens_count(tiny_config, tiny_tokenizer):
    model = tiny(tiny_config, tiny_tokenizer)
    flops = StepFlops.of(model)
    batch = caption_batch(tiny_tokenizer, text_lengths=(20, 5))
    out = forward(model, batch)
    assert int(sequence_lengths(batch, flops.visual_tokens_per_image, flops.image_token_id).sum()) == out.num_tokens
    assert flops.step(caption_batch(tiny_tokenizer, (20, 5), padded_to=40), 25) == flops.step(batch, 25)
    text_only = caption_batch(tiny_tokenizer, (20, 5), images=False)
    assert flops.step(batch, 25) - flops.step(text_only, 25) > 2 * flops.per_view  # two images and their visual tokens


def test_matmul_rate_is_measured():
    rate = measure_matmul_flops("cpu", torch.float32, size=256, repeats=2)
    assert 1e8 < rate < 1e14


def test_a_peak_measured_on_a_busy_machine_is_measured_again(tmp_path, caption_manifest, monkeypatch):
    """A matrix product timed while other work ran gives too low a peak; the first step that beats it
    measures again, so MFU never reads above 1."""
    measurements = []

    def measure(device, dtype):
        measurements.append(dtype)
        return 1.0 if len(measurements) == 1 else 1e13  # busy at the start, idle afterwards

    monkeypatch.setattr(callbacks, "measure_matmul_flops", measure)
    system = tiny_system("stage1", warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
    throughput = StepThroughput()
    trainer = fit(system, data, tmp_path, steps=3, callbacks=[throughput])
    assert len(measurements) == 2 and throughput.peak_flops == 1e13
    mfu = float(trainer.callback_metrics["perf/mfu"])
    torch.testing.assert_close(mfu, float(trainer.callback_metrics["perf/tflops_per_s"]) * 1e12 / 1e13)
    assert 0 < mfu < 1


def test_a_peak_below_every_step_is_measured_again_once(tmp_path, caption_manifest, monkeypatch):
    """Where the product is always slower than the model (fp32 on an AVX2 CPU), the step is not held up by a
    measurement each time it is fastest: one more, then the fastest step's rate is the peak."""
    measurements = []
    monkeypatch.setattr(callbacks, "measure_matmul_flops", lambda device, dtype: measurements.append(dtype) or 1.0)
    system = tiny_system("stage1", warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
    trainer = fit(system, data, tmp_path, steps=4, callbacks=[StepThroughput()])
    assert len(measurements) == 2
    assert 0 < float(trainer.callback_metrics["perf/mfu"]) <= 1


def test_training_logs_throughput_and_mfu(tmp_path, caption_manifest):
    system = tiny_system("stage1", warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
    trainer = fit(system, data, tmp_path, steps=3, callbacks=[StepThroughput(peak_flops=1e11)])
    metrics = trainer.callback_metrics
    assert 0 < float(metrics["perf/mfu"]) < 1
    torch.testing.assert_close(float(metrics["perf/mfu"]), float(metrics["perf/tflops_per_s"]) * 1e12 / 1e11)
    assert float(metrics["perf/tokens_per_s"]) > 0 and float(metrics["perf/samples_per_s"]) > 0
