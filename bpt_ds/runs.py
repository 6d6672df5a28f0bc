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
    one stage, and `output_dir=...` to the pipeline. Every stage's config is built and
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
    for text in overrides:
        key, _ = parse_override(text)
        head = key.split(".", 1)[0]
        if key == "output_dir":
            root = parse_override(text)[1]
        elif head in per_stage and "." in key:
            per_stage[head].append(text.split(".", 1)[1])
        else:
            shared.append(text)
    runs, dirs = [], {}
    for i, (name, st) in enumerate(zip(names, stages)):
        merged = _deep_merge(defaults, {k: v for k, v in st.items() if k != "name"})
        merged.setdefault("output_dir", f"{root}/{name}")
        for text in shared + per_stage[name]:
            key, value = parse_override(text)
            set_dotted(merged, key, value)
        if seed is not None:
            merged["seed"] = seed
            merged["output_dir"] = f"{merged['output_dir']}/seed{seed}"
        merged = _substitute(merged, dirs, names[i:], f"pipeline '{path}', stage '{name}'")
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
                raise ConfigError(f"{where}: '{value}' refers to stage '{name}', which does not run before it")
        for name, d in dirs.items():
            value = value.replace("{" + name + "}", d)
    return value

