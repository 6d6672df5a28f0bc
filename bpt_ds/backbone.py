"""Loading the frozen T5 backbone, partitioned at load time under ZeRO-3.

`load_backbone` is the one way a run gets its model: a hub name or local directory
(or "tiny", the project's own small T5), every weight frozen, in the run's dtype.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch
from transformers import T5ForConditionalGeneration
from transformers.integrations import HfDeepSpeedConfig
from transformers.utils import cached_file

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Backbone:
    model: T5ForConditionalGeneration
    path: str
    # HfDeepSpeedConfig must outlive loading: transformers consults it (through a weak
    # reference) to partition weights as they are created.
    ds_handle: Optional[Any] = None
    lm_head_restored: bool = False


def resolve_model_path(name_or_path: str, progress: bool = True) -> str:
    if name_or_path == "tiny":
        from .tiny import build_tiny_backbone

        return str(build_tiny_backbone(progress=progress))
    return name_or_path


def is_zero3(ds_config: dict) -> bool:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def load_backbone(name_or_path: str, ds_config: dict, dtype: str = "bf16",
                  progress: bool = True) -> Backbone:
    path = resolve_model_path(name_or_path, progress)
    handle = HfDeepSpeedConfig(ds_config) if is_zero3(ds_config) else None
    if progress:
        print(f"[bpt_ds] loading backbone {path} ({dtype}"
              f"{', partitioned by ZeRO-3 as it loads' if handle else ''})", flush=True)
    try:
        model = T5ForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as e:
        raise FileNotFoundError(
            f"could not load model.name_or_path='{name_or_path}': {e}. Give a local directory "
            "written by save_pretrained, a hub name available offline, or 'tiny'") from None
    restored = restore_untied_lm_head(model, path, ds_config)
    model.requires_grad_(False)
    return Backbone(model, path, handle, restored)


# ----------------------------------------------------------------- lm_head trap


def checkpoint_tensor(path: str, key: str) -> Optional[torch.Tensor]:
    """Reads one tensor from a checkpoint (safetensors or .bin, sharded or not) without
    loading the rest; None when the checkpoint does not store that key."""
    from safetensors import safe_open

    def find(name: str) -> Optional[str]:
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    for single, index in [("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")]:
        file = find(single)
        if file is None and (index_file := find(index)) is not None:
            shard = json.loads(Path(index_file).read_text())["weight_map"].get(key)
            file = find(shard) if shard else None
            if shard is None:
                return None
        if file is None:
            continue
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(key) if key in f.keys() else None
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return state.get(key)
    return None


def restore_untied_lm_head(model: T5ForConditionalGeneration, path: str, ds_config: dict) -> bool:
    """Gives back a checkpoint's own lm_head when loading tied it to the embedding.

    T5 v1.1 and flan-t5 store an lm_head that differs from `shared`. transformers 5.x
    unties them on a plain load, but under ZeRO-3 loading (seen with 5.23) lm_head comes
    back as the very `shared` parameter. We compare against the file and, when they
    differ, put a separate, partitioned lm_head with the checkpoint's values in place.
    Returns True when it had to restore.
    """
    stored = checkpoint_tensor(path, "lm_head.weight")
    if stored is None:
        return False
    shared = checkpoint_tensor(path, "shared.weight")
    if shared is not None and torch.equal(stored, shared):
        return False  # the checkpoint itself is tied; nothing to restore
    head = model.lm_head
    if head.weight is model.get_input_embeddings().weight:
        # No dtype argument: zero.Init (0.19.8) ignores it on accelerators without fp16 and
        # takes bf16/fp32 from the config instead, which is what the backbone was loaded in.
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=is_zero3(ds_config)):
            head = torch.nn.Linear(head.in_features, head.out_features, bias=False,
                                   dtype=head.weight.dtype)
        model.lm_head = head
    embedding = model.get_input_embeddings().weight
    if shared is not None:
        # If loading had written lm_head's values into the shared embedding, the encoder
        # input would be wrong too, and no restore of lm_head could fix that.
        with deepspeed.zero.GatheredParameters([embedding]):
            if not torch.equal(embedding.detach().cpu(), shared.to(embedding.dtype)):
                raise RuntimeError(f"the input embedding of {path} does not match its checkpoint "
                                   "after loading; refusing to train on a corrupted backbone")
    with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=0):
        if torch.equal(head.weight.detach().cpu(), stored.to(head.weight.dtype)):
            return False
        head.weight.data.copy_(stored.to(head.weight.dtype))
    log.warning("lm_head of %s came back tied to the input embedding; restored the checkpoint's own lm_head", path)
    return True


@torch.no_grad()
def sample_vocab_embeddings(model: T5ForConditionalGeneration, n: int, generator: torch.Generator,
                            top: int = 5000) -> torch.Tensor:
    """Embeddings of n token ids drawn from the `top` most frequent pieces (Lester et al. 2021).

    SentencePiece orders pieces roughly by frequency; ids 0-2 (pad, eos, unk) are skipped.
    """
    emb = model.get_input_embeddings()
    high = min(emb.num_embeddings, top + 3)
    ids = torch.randint(3, high, (n,), generator=generator)
    with deepspeed.zero.GatheredParameters([emb.weight]):
        return emb(ids.to(emb.weight.device)).float().cpu()
