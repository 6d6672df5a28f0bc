"""Hugging Face peft adapters to and from bpt_ds prompt files.

    python -m bpt_ds.peft_io export RUN_DIR_OR_PROMPTS ADAPTER_DIR [--particle K] [--base-model NAME]
    python -m bpt_ds.peft_io import ADAPTER_DIR PROMPTS.safetensors

The mapping (what `PeftModel.from_pretrained(t5, ADAPTER_DIR)` then computes is what bpt_ds
computes with the same weights):

| bpt_ds                                   | peft                                                  |
| ---------------------------------------- | ----------------------------------------------------- |
| `particles` [1, l, d] (S)                | `prompt_embeddings` [l, d] (the prompt embedding)      |
| `factors.<task>.U` [l, r], in task order | `prefix_task_cols` [T, l, r]                          |
| `factors.<task>.V` [r, d], in task order | `prefix_task_rows` [T, r, d]                          |
| prompt = S ∘ (U_t V_t), encoder only     | MultitaskPromptTuningConfig, num_transformer_submodules=1 |
| prompt = S, encoder only                 | PromptTuningConfig, num_transformer_submodules=1      |

bpt_ds prompts the encoder only. peft's default for seq2seq models is two submodules
(encoder and decoder rows, 2l in all); the export sets num_transformer_submodules=1 so the
adapter holds exactly the l encoder rows. On import, a plain prompt-tuning adapter with two
submodules keeps its first l rows (peft's seq2seq forward feeds only those to the encoder);
a multitask adapter with two submodules also prompts the decoder, which bpt_ds does not
model, and is refused. peft knows tasks by index: the export writes the order to tasks.json
(and prints it), and the import reads it back. Several particles (a BMTPT posterior, MPT
teachers) export one at a time (--particle k) or as their mean.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from .backbone import resolve_model_path
from .files import atomic_write
from .prompts import TASKS_FILE, PeftIOError, import_peft, load_prompts_file  # noqa: F401  (import_peft: this CLI's)

def _factor_tasks(tensors: dict) -> list[str]:
    return [k[len("factors."):-len(".U")] for k in tensors if k.startswith("factors.") and k.endswith(".U")]


def export_peft(source: str, out_dir: str, base_model: Optional[str] = None, particle: Optional[int] = None,
                tasks: Optional[list[str]] = None) -> dict:
    """Writes adapter_config.json, adapter_model.safetensors and tasks.json; returns a summary."""
    from peft import MultitaskPromptTuningConfig, PromptTuningConfig
    from safetensors.torch import save_file

    src = Path(source)
    tensors = load_prompts_file(source, key="export source")
    run_dir = src if src.is_dir() else src.parent
    run = _run_config(run_dir)
    if base_model is None:
        base_model = _run_base_model(run, run_dir)
    particles = tensors["particles"]
    m, length, dim = particles.shape
    if particle is not None:
        if not 0 <= particle < m:
            raise PeftIOError(f"{source} holds {m} particles; --particle must be in 0..{m - 1}")
        shared, exported = particles[particle], f"particle {particle} of {m}"
    elif m > 1 and run.get("stage") == "mpt-teachers":
        raise PeftIOError(f"{source} holds one teacher prompt per task (stage mpt-teachers), whose mean is no "
                          f"prompt of any task: export one with --particle K (0..{m - 1})")
    else:
        # One particle: itself; several: their mean (the BMTPT aggregate), which the summary says.
        shared, exported = particles.mean(0), (f"the mean of {m} particles (--particle K exports one)" if m > 1
                                               else "the prompt")
    names = tasks or _task_order(run, _factor_tasks(tensors))
    common = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=length, token_dim=dim,
                  num_transformer_submodules=1, base_model_name_or_path=base_model)
    weights = {"prompt_embeddings": shared.float().contiguous()}
    if names:
        u = torch.stack([tensors[f"factors.{t}.U"] for t in names]).float()
        v = torch.stack([tensors[f"factors.{t}.V"] for t in names]).float()
        config = MultitaskPromptTuningConfig(**common, num_tasks=len(names), num_ranks=u.shape[-1],
                                             prompt_tuning_init="RANDOM")
        weights["prefix_task_cols"], weights["prefix_task_rows"] = u.contiguous(), v.contiguous()
    else:
        config = PromptTuningConfig(**common, prompt_tuning_init="RANDOM")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    atomic_write(out / "adapter_model.safetensors", lambda f: save_file(weights, str(f)))
    atomic_write(out / TASKS_FILE, lambda f: f.write_text(json.dumps(names) + "\n"))
    return {"type": type(config).__name__, "tasks": names, "shape": [length, dim], "particles": m,
            "exported": exported, "base_model": base_model}


def _run_config(run_dir: Path) -> dict:
    """The config.yaml of the run that wrote the prompts ({} when there is none)."""
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return {}
    import yaml

    return yaml.safe_load(cfg.read_text()) or {}


def _run_base_model(run: dict, run_dir: Path) -> Optional[str]:
    """The backbone a run used, as a path or hub name peft can record: the directory the run
    itself loaded (done.json's `backbone`) for names it resolved ("tiny", "random:..."), so the
    adapter names the model it was trained on, not what this environment resolves today."""
    name = run.get("model", {}).get("name_or_path")
    done = run_dir / "done.json"
    if done.is_file():
        loaded = json.loads(done.read_text()).get("backbone")
        if loaded:
            return loaded
    if name == "tiny" or (name or "").startswith("random:"):
        return str(resolve_model_path(name, progress=False))
    return name


def _task_order(run: dict, names: list[str]) -> list[str]:
    """The run's task order (its config's data.tasks then data.eval_tasks) for the factor tasks."""
    data = run.get("data", {})
    order = list(dict.fromkeys((data.get("tasks") or []) + (data.get("eval_tasks") or [])))
    return order if names and sorted(order) == sorted(names) else sorted(names)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpt_ds.peft_io", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run's prompts (or a prompts.safetensors) to a peft adapter directory")
    ex.add_argument("source")
    ex.add_argument("adapter_dir")
    ex.add_argument("--particle", type=int, default=None, help="export particle K (default: the particles' mean)")
    ex.add_argument("--base-model", default=None, help="recorded in adapter_config.json (default: the run's model)")
    im = sub.add_parser("import", help="a peft prompt-tuning adapter to a bpt_ds prompts.safetensors "
                                       "(use it as prompt.init_file)")
    im.add_argument("adapter_dir")
    im.add_argument("output")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            info = export_peft(args.source, args.adapter_dir, args.base_model, args.particle)
            tasks = ", ".join(f"{i}: {t}" for i, t in enumerate(info["tasks"])) or "none (one prompt)"
            print(f"wrote {info['type']} adapter [{info['shape'][0]} x {info['shape'][1]}] to {args.adapter_dir}: "
                  f"{info['exported']}; base model {info['base_model']}; peft task_ids: {tasks}")
        else:
            from safetensors.torch import save_file

            tensors = import_peft(args.adapter_dir)
            atomic_write(Path(args.output), lambda f: save_file(tensors, str(f)))
            print(f"wrote {args.output}: {', '.join(f'{k} {list(v.shape)}' for k, v in tensors.items())}")
    except (PeftIOError, FileNotFoundError) as e:
        print(f"bpt_ds.peft_io: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
