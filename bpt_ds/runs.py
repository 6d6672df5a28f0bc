"""What a command asks for: its run configs, built and checked before anything starts
(load_config: one run; load_runs: one run, or a pipeline of stages chained by output paths).
Light: no DeepSpeed (bpt_ds.pipeline runs what this returns).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .config import RunConfig, build_config, parse_override, read_yaml, set_dotted
from .errors import ConfigError
from .stages import STAGES


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Builds the run config from an optional YAML file plus dotted overrides, then validates it."""
    raw = read_yaml(path)
    if "stages" in raw:
        raise ConfigError(f"config file '{path}' is a pipeline (it has 'stages'); run it with load_runs")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return build_config(raw, STAGES)


PIPELINE_KEYS = ("output_dir", "defaults", "stages")
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig))


def load_runs(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (),
              seed: Optional[int] = None) -> list[tuple[str, RunConfig]]:
    """The runs a config file asks for, as (name, config): one for a run config, several for a pipeline.

    seed: one run of a multi-seed command: every stage gets this seed and writes to
    <its output_dir>/seed<seed> (a pipeline's {name} references follow).

    A pipeline file chains stages by output path:

        output_dir: runs/bmtpt          # stage <name> writes to <output_dir>/<name>
        defaults: {model: ..., seed: 1} # keys every stage shares
        stages:
          - name: source
            stage: bmtpt-source
          - name: target
            stage: target
            prompt: {init_file: "{source}"}   # {name}: that earlier stage's output directory

    Overrides `key=value` apply to every stage (after its own keys), `<name>.key=value` to
    one stage, and `output_dir=...` to the pipeline. A stage with `each_task` and/or
    `each_seed` lists runs once per task and seed (_expand). Every stage's config is built and
    validated before the first one runs.
    """
    raw = read_yaml(path)
    if "stages" not in raw:
        cfg = load_config(path, overrides)
        if seed is not None:
            cfg = load_config(path, list(overrides) + [f"seed={seed}", f"output_dir={cfg.output_dir}/seed{seed}"])
        return [("run", cfg)]
    unknown = sorted(set(raw) - set(PIPELINE_KEYS))
    if unknown:
        raise ConfigError(f"pipeline '{path}': unknown top-level key(s) {unknown}; a pipeline has "
                          f"{', '.join(PIPELINE_KEYS)} (stage keys go under defaults or a stage)")
    stages, defaults = raw["stages"], raw.get("defaults") or {}
    if not isinstance(stages, list) or not stages or not all(isinstance(st, dict) for st in stages):
        raise ConfigError(f"pipeline '{path}': 'stages' must be a non-empty list of mappings")
    if not isinstance(defaults, dict):
        raise ConfigError(f"pipeline '{path}': 'defaults' must be a mapping of run config keys")
    stages = _expand(stages, overrides, f"pipeline '{path}'")
    if seed is not None and any(st.get("_each_seed") for st in stages):
        raise ConfigError(f"pipeline '{path}': --seeds and a stage's each_seed both set the seeds; use one")
    names = [str(st.get("name", "")) for st in stages]
    for i, name in enumerate(names):
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"pipeline '{path}': stages[{i}] needs a 'name' of letters, digits, - or _; "
                              f"got {name!r}")
        if name in names[:i]:
            raise ConfigError(f"pipeline '{path}': two stages are named '{name}'")
        if name in RUN_KEYS:
            raise ConfigError(f"pipeline '{path}': stage name '{name}' is also a config key, so '{name}.x=...' "
                              "overrides would be ambiguous; choose another name")
    root = raw.get("output_dir", "runs/pipeline")
    shared: list[str] = []
    per_stage: dict[str, list[str]] = {n: [] for n in names}
    expanded = {str(st.get("name")): [n for n, e in zip(names, stages)
                                      if e.get("_output_parts", [None])[0] == st.get("name")] for st in raw["stages"]}
    for text in overrides:
        key, _ = parse_override(text)
        head, _, rest = key.partition(".")
        if key == "output_dir":
            root = parse_override(text)[1]
        elif rest in EACH_KEYS and head in expanded:
            continue  # taken by _expand
        elif head in per_stage and "." in key:
            per_stage[head].append(text.split(".", 1)[1])
        elif head in expanded and expanded[head] and "." in key:
            for n in expanded[head]:  # <name>.key of an expanded stage: every stage it became
                per_stage[n].append(text.split(".", 1)[1])
        else:
            shared.append(text)
    runs, dirs = [], {}
    for i, (name, st) in enumerate(zip(names, stages)):
        merged = _deep_merge(defaults, {k: v for k, v in st.items() if k != "name" and not k.startswith("_")})
        if "_output_parts" in st:  # expanded: <output_dir>/<name>/<task>/seed<seed>, under its own or the root
            parent = merged.pop("output_dir", None) or root + "/" + st["_output_parts"][0]
            merged["output_dir"] = "/".join([parent, *st["_output_parts"][1:]])
        merged.setdefault("output_dir", f"{root}/{name}")
        for text in shared + per_stage[name]:
            key, value = parse_override(text)
            listed = ("each_seed" if key == "seed" and st.get("_each_seed") else
                      "each_task" if key == "data.tasks" and st.get("_each_task") else None)
            if listed:
                raise ConfigError(f"pipeline '{path}', stage '{name}': '{text}' would override what its {listed} "
                                  f"list sets; change the list instead ({st['_output_parts'][0]}.{listed}=[...])")
            set_dotted(merged, key, value)
        if seed is not None:
            merged["seed"] = seed
            merged["output_dir"] = f"{merged['output_dir']}/seed{seed}"
        merged = _substitute(merged, dirs, names[i:] + [n for n in expanded if n not in names],
                             f"pipeline '{path}', stage '{name}'")
        try:
            cfg = build_config(merged, STAGES)
        except ConfigError as e:
            raise ConfigError(f"pipeline '{path}', stage '{name}': {e}") from None
        if cfg.output_dir in dirs.values():
            other = next(n for n, d in dirs.items() if d == cfg.output_dir)
            raise ConfigError(f"pipeline '{path}': stages '{other}' and '{name}' both write to {cfg.output_dir}; "
                              "give each stage its own output_dir (or leave it unset: <output_dir>/<name>)")
        dirs[name] = cfg.output_dir
        runs.append((name, cfg))
    return runs


EACH_KEYS = ("each_task", "each_seed")


def _expand(stages: list[dict], overrides, where: str) -> list[dict]:
    """A stage with each_task: [a, b] and/or each_seed: [1, 2] becomes one stage per task and
    seed (their product), named <name>-<task>-seed<seed>, with data.tasks=[task], seed=<seed>
    and output_dir <output_dir>/<name>/<task>/seed<seed> (the table commands of configs/paper).
    `<name>.each_task=[...]` on the command line replaces a stage's list."""
    lists: dict[str, dict] = {}
    for text in overrides:
        key, value = parse_override(text)
        head, _, rest = key.partition(".")
        if rest in EACH_KEYS:
            lists.setdefault(head, {})[rest] = value
    out = []
    for st in stages:
        name = str(st.get("name", ""))
        each = {k: lists.get(name, {}).get(k, st.get(k)) for k in EACH_KEYS}
        if each["each_task"] is None and each["each_seed"] is None:
            out.append(st)
            continue
        for key, value in each.items():
            if value is not None and (not isinstance(value, list) or not value or
                                      len(set(map(str, value))) != len(value)):
                raise ConfigError(f"{where}, stage '{name}': '{key}' must be a non-empty list without repeats; "
                                  f"got {value!r}")
        if each["each_seed"] is not None and not all(isinstance(v, int) and not isinstance(v, bool)
                                                     for v in each["each_seed"]):
            raise ConfigError(f"{where}, stage '{name}': 'each_seed' must list integer seeds; got {each['each_seed']!r}")
        base = {k: v for k, v in st.items() if k not in EACH_KEYS}
        for task in each["each_task"] or [None]:
            for seed in each["each_seed"] or [None]:
                one = _deep_merge(base, {"data": {"tasks": [task]}} if task is not None else {})
                suffix = "".join([f"-{task}" if task is not None else "", f"-seed{seed}" if seed is not None else ""])
                one["name"] = f"{name}{suffix}"
                one["_each_task"] = task is not None
                if seed is not None:
                    one["seed"], one["_each_seed"] = seed, True
                parts = [str(task)] if task is not None else []
                parts += [f"seed{seed}"] if seed is not None else []
                one["_output_parts"] = [name, *parts]
                out.append(one)
    return out


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _substitute(value: Any, dirs: dict[str, str], later: list[str], where: str) -> Any:
    """Replaces {name} in strings with the output directory of the earlier stage `name`."""
    if isinstance(value, dict):
        return {k: _substitute(v, dirs, later, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, dirs, later, where) for v in value]
    if isinstance(value, str) and "{" in value:
        for name in later:
            if "{" + name + "}" in value:
                raise ConfigError(f"{where}: '{value}' refers to stage '{name}', which does not run before it "
                                  "(or runs once per task or seed: refer to one of the stages it becomes)")
        for name, d in dirs.items():
            value = value.replace("{" + name + "}", d)
    return value

