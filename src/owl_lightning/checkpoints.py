"""Reading checkpoints and exports back into a model; nothing in a file from elsewhere runs code.

A 7B LLM is 13 GB per save and never changes in either stage's frozen part, so a checkpoint keeps
every parameter except the LLM's base weights (LoRA adapters and fully tuned LLMs are kept), plus the
model config; the base weights come back from the LLM source when the checkpoint is loaded.

What this module reads, and how:

- ``.ckpt`` files: ``torch.load(weights_only=True)``, tensors and plain containers only.
- Sharded checkpoint folders (FSDP2 runs: ``.distcp`` shards, DCP's ``.metadata``, Lightning's
  ``meta.pt``): ``.metadata`` through an unpickler that admits only torch's checkpoint-metadata
  classes, every shard file it names must lie in the folder, and every non-tensor item is read
  with ``weights_only=True``. torch's own reader uses plain ``pickle`` and ``weights_only=False``.
- Exported folders (:mod:`owl_lightning.export`): safetensors, JSON, and the export's own ``llm/``.

The stored model config is checked field by field (:func:`~owl_lightning.config.OwlConfig.from_dict`),
and it cannot choose where code or weights come from: ``trust_remote_code`` is off and the LLM comes
from the packaged SmolLM2, from ``random`` or from the export's own ``llm/`` folder, unless the caller
passes ``llm_source`` / ``trust_remote_code`` (the commands' ``--llm-source`` and
``--trust-remote-code``). The vision encoder is built without downloading anything: its weights are
in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from torch.distributed.checkpoint import FileSystemReader, load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from owl_lightning import export
from owl_lightning.config import BYTE_TOKENIZER, CHECKPOINT_PREFIX, PACKAGED_SMOLLM2, RANDOM_LLM, OwlConfig
from owl_lightning.files import atomic_write
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import OwlModel, build_owl
from owl_lightning.models.vision import position_embedding_for

# Lightning's sharded checkpoints are folders holding this file next to the .distcp shards.
SHARDED_METADATA_FILE = "meta.pt"
# transformers' attention kernels a stored config may name: none of them loads code from a hub.
KNOWN_ATTENTION = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
LLM_SOURCE_FLAG, TRUST_REMOTE_CODE_FLAG = "--llm-source", "--trust-remote-code"


class UntrustedCheckpoint(ValueError):
    """A checkpoint or export that would run code, read outside its folder, or load from elsewhere."""


# -- which tensors a checkpoint holds ---------------------------------------------------------------


def is_lora_weight(key: str) -> bool:
    return "lora_" in key


def holds_lora(state_dict: dict[str, Any]) -> bool:
    """Whether a checkpoint's weights include LoRA adapters (a stage-2 LoRA run)."""
    return any(is_lora_weight(key) for key in state_dict)


def is_base_llm_weight(key: str) -> bool:
    """``model.llm.*`` tensors other than LoRA adapters: restored from the LLM source, not saved (frozen)."""
    return key.startswith(CHECKPOINT_PREFIX + "llm.") and not is_lora_weight(key)


# -- sharded checkpoints ---------------------------------------------------------------------------


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder of ``.distcp`` shards plus Lightning's ``meta.pt`` (what ModelParallelStrategy saves)."""
    return Path(path).is_dir() and (Path(path) / SHARDED_METADATA_FILE).is_file()


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: its dataclasses, dtypes, sizes and layouts, nothing callable beyond."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a class of checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader`` with :class:`_MetadataUnpickler` for ``.metadata``, and every shard file
    that metadata names checked to lie inside the checkpoint folder."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as file:
                metadata = _MetadataUnpickler(file).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as err:
            raise UntrustedCheckpoint(
                f"{path}: not checkpoint metadata that can be read safely ({err}); "
                "this folder was not written by torch.distributed.checkpoint, or was altered"
            ) from None
        root = Path(self.path).resolve()
        for info in (metadata.storage_data or {}).values():
            file = (root / str(info.relative_path)).resolve()
            if file.parent != root:
                raise UntrustedCheckpoint(f"{path}: names the shard file {info.relative_path!r}, outside {root}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyBytes:
    """A load planner whose non-tensor items (numbers, strings, lists) are read with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            item = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UntrustedCheckpoint(
                f"checkpoint item {read_item.dest_index.fqn!r} holds objects other than tensors and plain values, "
                f"which are never unpickled here ({str(err).splitlines()[0]})"
            ) from None
        loaded = io.BytesIO()
        torch.save(item, loaded)
        loaded.seek(0)
        super().load_bytes(read_item, loaded)


class SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    """DCP's default load planner (loading into an existing state dict) without code execution."""


class _SafeEmptyLoadPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    pass


def load_sharded(state_dict: dict, path: str | Path, empty: bool = False) -> None:
    """``torch.distributed.checkpoint``'s load of the folder ``path`` into ``state_dict``, through the safe
    reader and planner (``empty``: fill an empty dict with everything saved, without a process group).

    Raises :class:`UntrustedCheckpoint` itself: DCP would wrap it in a ``CheckpointException`` per rank."""
    reader = SafeFileSystemReader(path)
    reader.read_metadata()  # a crafted .metadata is refused here, with its own message
    try:
        if empty:
            _load_state_dict(state_dict, storage_reader=reader, planner=_SafeEmptyLoadPlanner(), no_dist=True)
        else:
            load(state_dict, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as err:
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, UntrustedCheckpoint)]
        if refused:
            raise refused[0] from None
        raise


def read_sharded_checkpoint(path: str | Path) -> dict:
    """A sharded checkpoint folder as one Lightning checkpoint dict of whole tensors, in memory.

    Needs no process group and any number of processes may have written it. The optimizer states
    come back keyed as ``Optimizer.state_dict()`` keys them (parameter indices in group order), so
    a single-process Trainer can resume from :func:`consolidate`'s file.
    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (a folder with {SHARDED_METADATA_FILE} and .distcp files)")
    shards: dict = {}
    load_sharded(shards, path, empty=True)
    checkpoint = torch.load(path / SHARDED_METADATA_FILE, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = shards.pop("state_dict")
    count = len([key for key in shards if key.startswith("optimizer_")])
    checkpoint["optimizer_states"] = [_indexed_optimizer_state(shards.pop(f"optimizer_{i}")) for i in range(count)]
    return checkpoint


def _indexed_optimizer_state(state: dict) -> dict:
    """Distributed optimizer state (keyed by parameter name) → ``Optimizer.state_dict()`` form (keyed by index)."""
    index = {name: i for i, name in enumerate(name for group in state["param_groups"] for name in group["params"])}
    return {
        "state": {index[name]: values for name, values in state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]],
    }


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint folder as one ``.ckpt`` file (weights, optimizer, loop state, config)."""
    checkpoint = read_sharded_checkpoint(resolve_checkpoint(path))
    return atomic_write(out, lambda file: torch.save(checkpoint, file))


# -- any checkpoint ----------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path names: an exported folder, a ``.ckpt`` file or sharded folder, or a run folder
    (its ``checkpoints/last.ckpt``)."""
    path = Path(path)
    if export.is_export(path) or is_sharded_checkpoint(path) or path.is_file():
        return path
    last = path / "checkpoints" / "last.ckpt"
    if path.is_dir() and (last.is_file() or is_sharded_checkpoint(last)):
        return last
    raise FileNotFoundError(
        f"no checkpoint at {path}: pass a .ckpt file, a sharded checkpoint folder, an exported "
        "folder, or a run folder holding checkpoints/last.ckpt"
    )


def run_folder(path: str | Path) -> Path:
    """The run folder a checkpoint path belongs to (where ``eval.json`` and samples are written): the
    folder above ``checkpoints/``, an exported folder itself, or the checkpoint file's folder."""
    path = Path(path)
    checkpoint = resolve_checkpoint(path)
    if export.is_export(checkpoint):
        return checkpoint
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict from anything :func:`resolve_checkpoint` takes."""
    path = resolve_checkpoint(path)
    if export.is_export(path):
        return export.read_export(path)
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UntrustedCheckpoint(
            f"{path}: holds objects other than tensors and plain values, which are never unpickled here ({str(err).splitlines()[0]})"
        ) from None


_POS_EMBED = "vision.model.pos_embed"


def load_model_weights(model: OwlModel, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a checkpoint's tensors (``model.``-prefixed) into ``model``; every tensor must find its place."""
    own = {k[len(CHECKPOINT_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(CHECKPOINT_PREFIX)}
    # A ViT trained at another image size (vision.image_size) continues at this one: its position embeddings are resampled.
    pos_embed = getattr(model.vision.model, "pos_embed", None)
    if pos_embed is not None and _POS_EMBED in own and own[_POS_EMBED].shape != pos_embed.shape:
        own[_POS_EMBED] = position_embedding_for(model.vision.model, own[_POS_EMBED])
    # Missing keys are expected (the base LLM is not saved); tensors that fit nowhere are not.
    unexpected = model.load_state_dict(own, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} tensors do not fit this model, e.g. {unexpected[:3]}")


def trusted_config(checkpoint: dict, source: str, llm_source: str | None = None, trust_remote_code: bool = False) -> OwlConfig:
    """The model config a checkpoint (or export) read from ``source`` was trained with, checked, and with
    every setting that could load code or weights from elsewhere taken from the caller instead.

    Raises :class:`UntrustedCheckpoint` naming the flag to pass when the checkpoint's LLM came from
    anywhere but the packaged SmolLM2, a random build or the export's own ``llm/`` folder."""
    try:
        config = OwlConfig.from_dict(checkpoint["owl_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise UntrustedCheckpoint(f"{source}: its model config cannot be used ({err})") from None
    llm = config.llm
    own_llm = checkpoint.get("export_llm_folder")  # an export's own llm/ folder, checked by read_export
    if own_llm:
        llm_from, tokenizer = own_llm, own_llm
    elif llm_source:
        llm_from, tokenizer = llm_source, BYTE_TOKENIZER if llm.tokenizer == BYTE_TOKENIZER else llm_source
    elif llm.source in (PACKAGED_SMOLLM2, RANDOM_LLM) and llm.tokenizer in (None, BYTE_TOKENIZER):
        llm_from, tokenizer = llm.source, llm.tokenizer
    else:
        raise UntrustedCheckpoint(
            f"{source} was trained on the LLM {llm.source!r} (tokenizer {llm.tokenizer or llm.source!r}); a checkpoint does "
            f"not choose where weights are loaded from. Pass {LLM_SOURCE_FLAG} PATH_OR_HUB_ID (the LLM you trust, e.g. "
            f"{LLM_SOURCE_FLAG} {llm.source}) to load it with that LLM."
        )
    if llm.attn_implementation not in KNOWN_ATTENTION:
        raise UntrustedCheckpoint(
            f"{source}: llm.attn_implementation {llm.attn_implementation!r} is not one of {[k for k in KNOWN_ATTENTION if k]}"
        )
    base = config.vision.timm_name.partition(".")[0]
    if ":" in config.vision.timm_name or not timm.is_model(base):
        raise UntrustedCheckpoint(
            f"{source}: vision.timm_name {config.vision.timm_name!r} is not a timm architecture "
            "(a checkpoint cannot name a hub model or a local folder)"
        )
    llm = dataclasses.replace(
        llm,
        source=llm_from,
        tokenizer=tokenizer,
        trust_remote_code=trust_remote_code,
        architecture=llm.architecture if llm_from == RANDOM_LLM else None,
    )
    # The encoder's weights are in the checkpoint: nothing is read or downloaded for it.
    vision = dataclasses.replace(config.vision, weights=None)
    return dataclasses.replace(config, llm=llm, vision=vision)


def model_from_checkpoint(checkpoint: dict, source: str, llm_source: str | None = None, trust_remote_code: bool = False) -> OwlModel:
    """A full model (base weights + what the checkpoint trained) from a checkpoint dict read from ``source``."""
    config = trusted_config(checkpoint, source, llm_source, trust_remote_code)
    try:
        model = build_owl(config)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UntrustedCheckpoint(
                f"{source}: its LLM needs code from its own files to load; pass {TRUST_REMOTE_CODE_FLAG} only if you trust them ({err})"
            ) from None
        raise
    state = checkpoint["state_dict"]
    if holds_lora(state):
        model.add_lora(model.config.lora)
    load_model_weights(model, state, source)
    return model.eval()


def load_owl(path: str | Path, llm_source: str | None = None, trust_remote_code: bool = False) -> OwlModel:
    """A full model from a stage-1 or stage-2 checkpoint, a run folder or an exported folder."""
    return model_from_checkpoint(read_checkpoint(path), str(path), llm_source, trust_remote_code)


def template_settings(checkpoint: dict) -> dict:
    """The run's conversation-template settings as its data module had them: ``template`` and the
    unresolved ``system_prompt`` setting (see ``data.template.resolve_system_prompt``)."""
    data = checkpoint.get("datamodule_hyper_parameters", {})
    template, system_prompt = data.get("template", "owl"), data.get("system_prompt")
    if template not in ("owl", "chat_template") or not isinstance(system_prompt, (str, type(None))):
        raise UntrustedCheckpoint(f"template settings {template!r}, {system_prompt!r} are not a template style and a system prompt")
    return {"template": template, "system_prompt": system_prompt}


def export_checkpoint(ckpt: str | Path, out: str | Path, llm_source: str | None = None, trust_remote_code: bool = False) -> Path:
    """Export a stage-1/2 checkpoint (or run folder, or export) to ``out``, keeping its template settings."""
    checkpoint = read_checkpoint(ckpt)
    model = model_from_checkpoint(checkpoint, str(ckpt), llm_source, trust_remote_code)
    return export.write_export(model, load_tokenizer(model.config.llm), template_settings(checkpoint), out)
