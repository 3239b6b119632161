"""The embedded default's parts are real pretrained models (loads the packaged weights)."""

import pytest
import torch
from PIL import Image

from owl_lightning.config import get_config
from owl_lightning.models.llm import build_llm, load_tokenizer
from owl_lightning.models.vision import load_vision_weights

CAT_CLASSES = set(range(281, 286))  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_packaged_efficientnet_lite0_sees_a_cat():
    import skimage.data
    import timm

    vision = get_config("owl-smol").vision
    classifier = timm.create_model(vision.timm_name, pretrained=False).eval()
    load_vision_weights(classifier, vision.weights)
    # timm's own 224 px preprocessing of this model
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=classifier))
    with torch.no_grad():
        top5 = classifier(transform(Image.fromarray(skimage.data.chelsea()))[None]).topk(5).indices[0].tolist()
    assert top5[0] in CAT_CLASSES, top5


def test_missing_vision_weights_name_the_path(tmp_path):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vision_weights(model, str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("source", ["/nowhere/no-such-llm", "./no-such-llm", "~/no-such-llm"])
def test_a_missing_llm_folder_is_named(source):
    config = get_config("owl-tiny", {"llm.source": source, "llm.tokenizer": None}).llm
    for build in (build_llm, load_tokenizer):
        with pytest.raises(FileNotFoundError, match="LLM folder .*no-such-llm does not exist: set llm.source"):
            build(config)


def test_converted_smollm2_knows_the_capital_of_france():
    llm_config = get_config("owl-smol").llm
    tokenizer = load_tokenizer(llm_config)
    llm = build_llm(llm_config)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    answer = tokenizer.decode(llm.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :])
    assert "Paris" in answer
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
