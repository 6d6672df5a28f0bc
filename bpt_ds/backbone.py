"""Loading the frozen T5 backbone, partitioned at load time under ZeRO-3.

`load_backbone` is the one way a run gets its model: a hub name or local directory
(or "tiny", the project's own small T5), every weight frozen, in the run's dtype.
"""
from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch
from transformers import T5ForConditionalGeneration
from transformers.integrations import HfDeepSpeedConfig
from transformers.utils import cached_file

from .errors import ConfigError
from .plan import PlanError, resolve_dims
from .report import line, warn
from .tiny import build_once, build_tiny_backbone, default_cache_dir


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Backbone:
    model: T5ForConditionalGeneration
    path: str
    # HfDeepSpeedConfig must outlive loading: transformers consults it (through a weak
    # reference) to partition weights as they are created.
    ds_handle: Optional[Any] = None
    lm_head_restored: bool = False


RANDOM_PREFIX = "random:"
RANDOM_MARKER = "RANDOM_WEIGHTS"


def resolve_model_path(name_or_path: str, progress: bool = True) -> str:
    if name_or_path == "tiny":
        return str(build_tiny_backbone(progress=progress))
    if name_or_path.startswith(RANDOM_PREFIX):
        return str(random_backbone_dir(name_or_path[len(RANDOM_PREFIX):], progress))
    return name_or_path


def random_backbone_dir(spec: str, progress: bool = True) -> Path:
    """`random:<preset or dims>` (e.g. random:t5-v1_1-xl, random:d_model=512,num_layers=6): a
    directory with the published T5 config, the tiny backbone's tokenizer and no weights; the
    weights are drawn at load time, partitioned as they are created. For timing and memory
    work at real sizes without a download; nothing it predicts means anything."""
    import hashlib
    import shutil
    from dataclasses import asdict

    from transformers import T5Config

    try:
        dims = resolve_dims(spec) if spec else None
    except PlanError as e:
        raise ConfigError(f"model.name_or_path={RANDOM_PREFIX}{spec}: {e}") from None
    if dims is None:
        raise ConfigError(f"model.name_or_path: give a preset or dimensions after '{RANDOM_PREFIX}', "
                          f"e.g. {RANDOM_PREFIX}t5-v1_1-xl")
    tiny = build_tiny_backbone(progress=progress)
    tiny_vocab = json.loads((tiny / "config.json").read_text())["vocab_size"]
    if dims.vocab_size < tiny_vocab:
        raise ConfigError(f"model.name_or_path={RANDOM_PREFIX}{spec}: vocab_size {dims.vocab_size} is smaller than "
                          f"the tokenizer's {tiny_vocab} (random backbones use the tiny backbone's tokenizer)")
    key = hashlib.sha256(json.dumps([asdict(dims), tiny.name]).encode()).hexdigest()[:12]
    final = default_cache_dir() / f"random-t5-{key}"

    def build(staging: Path) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny / name, staging / name)
        T5Config(d_model=dims.d_model, d_ff=dims.d_ff, d_kv=dims.d_kv, num_heads=dims.num_heads,
                 num_layers=dims.num_layers, num_decoder_layers=dims.num_decoder_layers,
                 vocab_size=dims.vocab_size, relative_attention_num_buckets=dims.num_buckets,
                 feed_forward_proj="gated-gelu" if dims.gated else "relu", tie_word_embeddings=dims.tied,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1).save_pretrained(staging)
        (staging / RANDOM_MARKER).write_text(json.dumps({"spec": spec, **asdict(dims)}) + "\n")  # written last

    build_once(final, lambda path: (path / RANDOM_MARKER).is_file(), build)
    return final


RANDOM_CHUNK = 1 << 20  # values per seeded draw of a random backbone's weights


@torch.no_grad()
def init_random_weights(model: T5ForConditionalGeneration, ds_config: Optional[dict] = None, seed: int = 0) -> None:
    """Deterministic random weights (normal, std d_model^-0.5; norms 1), the same for every
    rank, world size and ZeRO stage, drawn where they are stored: under ZeRO-3 each rank
    fills only its own partition (`ds_tensor`), nothing is gathered. Element k of a
    parameter's flattened values comes from chunk k // RANDOM_CHUNK, drawn from a generator
    seeded by (seed, parameter name, chunk), so a rank draws only the chunks its partition
    overlaps. `ds_config` is not needed (partitioned parameters are recognised by their
    `ds_tensor`); it is accepted for the callers that pass it."""
    import hashlib

    import torch.distributed as dist

    std = model.config.d_model ** -0.5
    for name, p in model.named_parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: rank r holds flat elements [r * n, (r + 1) * n), zero-padded
            local = p.ds_tensor.data.view(-1)
            group = getattr(p, "ds_process_group", None)
            start = local.numel() * (dist.get_rank(group=group) if dist.is_initialized() else 0)
            numel = p.ds_numel
        else:
            local, start, numel = p.data.view(-1), 0, p.numel()
        mine = max(0, min(local.numel(), numel - start))  # this rank's real (unpadded) values
        local[mine:].zero_()
        if "layer_norm" in name:
            local[:mine].fill_(1)
            continue
        key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")
        gen = torch.Generator()
        for chunk in range(start // RANDOM_CHUNK, (start + mine - 1) // RANDOM_CHUNK + 1 if mine else 0):
            lo = chunk * RANDOM_CHUNK
            values = torch.randn(min(RANDOM_CHUNK, numel - lo), generator=gen.manual_seed(key + chunk))
            a, b = max(lo, start), min(lo + values.numel(), start + mine)
            local[a - start:b - start].copy_(values[a - lo:b - lo].mul_(std))


def is_zero3(ds_config: dict) -> bool:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def load_backbone(name_or_path: str, ds_config: dict, dtype: str = "bf16",
                  progress: bool = True, attn_implementation: str = "sdpa") -> Backbone:
    path = resolve_model_path(name_or_path, progress)
    zero3 = is_zero3(ds_config)
    if progress:
        line(f"[bpt_ds] loading backbone {path} ({dtype}{', partitioned by ZeRO-3 as it loads' if zero3 else ''})")
    if (Path(path) / RANDOM_MARKER).is_file():
        from transformers import AutoConfig, AutoModelForSeq2SeqLM
        from transformers.initialization import no_init_weights

        # Our own zero.Init, entered before the HfDeepSpeedConfig exists: with it, transformers
        # would gather every module after construction to run its initializers on rank 0 (and
        # init_random_weights would overwrite them). no_init_weights leaves the new tensors
        # untouched (torch's initializers too); init_random_weights fills the partitions.
        init = deepspeed.zero.Init(config_dict_or_path=ds_config) if zero3 else contextlib.nullcontext()
        with init, no_init_weights():
            model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(path), dtype=DTYPES[dtype],
                                                      attn_implementation=attn_implementation)
        model.tie_weights()  # init_weights, skipped above, also ties the stacks' embeddings to `shared`
        handle = HfDeepSpeedConfig(ds_config) if zero3 else None
        if not getattr(model.config, "scale_decoder_outputs", True):  # v1.1 / flan sizes: lm_head of its own
            untie_lm_head(model, ds_config)
        # The parameters that tying replaced (the stacks' embeddings, the tied lm_head) hold
        # partitions in reference cycles (DeepSpeed binds methods to each parameter): free them now.
        gc.collect()
        init_random_weights(model)
        model.requires_grad_(False)
        return Backbone(model, path, handle, False)
    handle = HfDeepSpeedConfig(ds_config) if zero3 else None
    try:
        model = T5ForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype],
                                                           attn_implementation=attn_implementation)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load model.name_or_path='{name_or_path}': {e}. Give a local directory "
            "written by save_pretrained, a hub name available offline, 'tiny', or random:<T5 size>") from None
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
    head = untie_lm_head(model, ds_config)
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
    warn(f"lm_head of {path} came back tied to the input embedding; restored the checkpoint's own lm_head")
    return True


def untie_lm_head(model: T5ForConditionalGeneration, ds_config: dict) -> torch.nn.Linear:
    """Gives the model an lm_head of its own (partitioned under ZeRO-3) when it is the input
    embedding (transformers 5.x ties them always); returns the head."""
    head = model.lm_head
    if head.weight is model.get_input_embeddings().weight:
        # No dtype argument: zero.Init (0.19.8) ignores it on accelerators without fp16 and
        # takes bf16/fp32 from the config instead, which is what the backbone was loaded in.
        # zero.Init(enabled=False) would still parse the config and start torch.distributed.
        with (deepspeed.zero.Init(config_dict_or_path=ds_config) if is_zero3(ds_config) else contextlib.nullcontext()):
            head = torch.nn.Linear(head.in_features, head.out_features, bias=False,
                                   dtype=head.weight.dtype)
        model.lm_head = head
    return head


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
