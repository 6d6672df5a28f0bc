"""Prompt tuning (stage `pt`) and SPoT (stage `spot`) on a frozen T5.

Features, and how each is switched on:
- M prompt particles in one forward pass (particle index folded into the batch): prompt.particles
- per-task low-rank factors, prompt = S ∘ (U_t V_t): prompt.factors.rank > 0, their lr train.factor_lr
- prompt init: prompt.init = random | vocab | file (prompt.init_file); stage spot starts from a file
- multitask training on synthetic tasks or local files: data.tasks, data.local.<name>.*
- gradient accumulation: train.global_batch_size / (train.micro_batch_size x ranks)
  (micro-batch null: the largest divisor of global / ranks up to 16)
- learning-rate schedule: train.schedule, train.warmup_steps
- evaluation (rank classification, or generation for QA and data.eval_mode=generate; the
  metrics of bpt_ds.metrics) every train.eval_every steps (and at step 0 with
  train.eval_at_start); early stopping: train.patience
- checkpoints of trainable state every train.save_every steps; resume: train.resume=auto
- activation checkpointing of the frozen backbone: model.gradient_checkpointing
Outputs in output_dir: config.yaml, ds_config.json (the resolved DeepSpeed config),
prompts.safetensors (final), prompts_best.safetensors (best dev score), metrics.json (dev and
test metrics of the best dev step, bpt_ds.metrics), tb/ (TensorBoard), checkpoints/.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from .. import engine as eng
from ..backbone import load_backbone, resolve_model_path, sample_vocab_embeddings
from ..config import ConfigError, RunConfig, to_dict, to_yaml
from ..data.batching import LengthGroupedSampler, MixtureSampler, collate, encode_task
from ..data.tasks import DataError, load_task
from ..metrics import compute as compute_metrics
from ..model import PromptedT5
from ..prompts import PromptBank, load_prompts_file

log = logging.getLogger(__name__)

DONE_FILE = "done.json"


# Keys a resumed run may change: they say how long to train and what to log, not what a step computes.
RESUME_FREE = {"output_dir", "train.steps", "train.resume", "train.log_every", "train.eval_every",
               "train.eval_at_start", "train.save_every", "train.keep_checkpoints", "train.patience",
               "train.eval_batch_size", "data.eval_tasks", "data.max_eval_examples", "method",
               # How the job is guarded, not what it computes.
               "deepspeed.memory_check", "deepspeed.device_memory_gb", "deepspeed.memory_reserve_gb",
               "deepspeed.timeout_minutes", "train.max_bad_steps", "train.save_retry_minutes",
               # How a step runs, not what it computes (up to float rounding).
               "model.compile", "train.fused_adamw"}


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


# What the code computes beyond the config: the loss a step minimizes. Checkpoints and done.json
# written before 2026-12 (each row's mean token loss) carry no such entry, so a resume of one, or a
# pipeline rerun over one, sees it changed instead of silently mixing two objectives.
LOSS_CONVENTION = "per target token; bmtpt-source: summed token NLL per example"


def config_fingerprint(cfg: RunConfig) -> dict:
    """What a run computes: the config as flat keys, without the keys a resume may change, and
    the loss convention (LOSS_CONVENTION)."""
    flat = _flat(json.loads(json.dumps(to_dict(cfg))))
    out = {k: v for k, v in flat.items() if k not in RESUME_FREE}
    out["loss_convention"] = LOSS_CONVENTION
    return out


def input_digests(cfg: RunConfig) -> dict[str, str]:
    """sha256 of the prompt files a run starts from or uses as prior (they come from other runs)."""
    import hashlib

    files = []
    if cfg.prompt.init == "file" and cfg.prompt.init_file:
        files.append(cfg.prompt.init_file)
    if cfg.prior.beta > 0:
        files.append(cfg.prior.file or cfg.prompt.init_file)
    if cfg.stage == "mpt-distill" and cfg.distill.teachers:
        files.append(cfg.distill.teachers)
    out = {}
    for name in files:
        path = Path(name) / "prompts.safetensors" if Path(name).is_dir() else Path(name)
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    return out


def schedule_note(t, saved_steps: Optional[int], step: int, before: float, after: float) -> Optional[str]:
    """What a resume at `step` with train.steps other than the checkpoint's (`saved_steps`; None in
    checkpoints that do not record it) does to the LR: the schedule is rebuilt over the new
    train.steps, so the run goes on as a run of that many steps would from this step (the LR
    going from `before`, the old schedule's, to `after`). None when nothing changes."""
    if step >= t.steps or t.schedule == "constant":
        return None
    if saved_steps is None and before == after:
        return None
    if saved_steps is not None and saved_steps == t.steps:
        return None
    what = (f"train.steps {saved_steps} -> {t.steps}: the {t.schedule} learning-rate schedule is rebuilt over "
            f"{t.steps} steps" if saved_steps is not None else
            f"the {t.schedule} learning-rate schedule is rebuilt over train.steps={t.steps} (the checkpoint does not "
            "record the total it was written under)")
    lr = (f"goes from {before:.4g} to {after:.4g}" if before != after else f"stays {after:.4g}")
    return f"{what}; the LR at step {step} {lr} (as in a run of {t.steps} steps) and follows that schedule from there"


def finished(cfg: RunConfig) -> Optional[str]:
    """What output_dir holds for this config (see finish): "done" (finished outputs of this
    config and these input files), "other" (finished outputs of another config or other inputs),
    "short" (finished outputs of this config with fewer steps than train.steps now asks for), or
    None (no finished outputs)."""
    marker = Path(cfg.output_dir) / DONE_FILE
    if not marker.is_file() or not (Path(cfg.output_dir) / "prompts.safetensors").is_file():
        return None
    try:
        done = json.loads(marker.read_text())
        if done["fingerprint"] != config_fingerprint(cfg) or done["inputs"] != input_digests(cfg):
            return "other"
        return "done" if done["stopped"] or done["step"] >= cfg.train.steps else "short"
    except (ValueError, KeyError, TypeError):
        return "other"


class PromptTuning:
    # "every": each particle sees the whole global batch (independent prompts);
    # "split": particle m owns block m of the global batch (SVGD; Placement explains).
    placement_mode = "every"
    # The loss a particle minimizes over its share of the global batch: "token", the summed token
    # cross-entropy over its target tokens (Hugging Face's and peft's mean token loss), or
    # "example", each example's summed token NLL averaged over its examples (SVGD's likelihood).
    loss_unit = "token"
    # What evaluation scores when the bank holds M > 1 particles (README, "What evaluation scores"):
    # True, the particles' posterior predictive (1/M) Σ_m p_m(y | x), for rank classification and
    # generation alike; False (mpt-teachers), the bank's aggregate prompt of each example, there its
    # task's own teacher. With M = 1 it is the prompt itself either way.
    eval_ensemble = True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.writer = None
        self.step = 0
        self.best = float("-inf")
        self.evals_without_gain = 0
        self.stopped = False
        # Steps skipped for a non-finite loss, gradient or direction: in a row, and in all.
        self.bad_in_row = 0
        self.bad_total = 0
        self.checkpoint: Optional[str] = None  # the newest checkpoint written or resumed from
        self.retry_minutes_spent = 0.0  # waiting for a full or read-only disk (_write)
        self.last_metrics: dict = {}
        self.last_eval_step = -1
        # The evaluation with the best mean dev score: its step, dev and test metrics.
        self.selected: dict = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        eng.init_distributed(cfg.deepspeed.timeout_minutes)
        self.rank, self.world = eng.rank(), eng.world_size()
        self.is_main = self.rank == 0
        torch.manual_seed(cfg.seed)
        self.ds_config = ds_config = eng.resolve_ds_config(cfg, self.world)
        self.adjust_ds_config(ds_config)
        self.placement = self.placement_for(cfg, self.world)
        # Every rank writes checkpoint shards: an output_dir it cannot write fails now, not at step save_every.
        eng.on_every_rank(lambda: eng.check_writable(self.out))

        # Data and the init file first: bad input fails before the backbone is loaded.
        train_names = cfg.data.tasks
        eval_names = cfg.data.eval_tasks or train_names
        self.task_names = list(dict.fromkeys(train_names + eval_names))
        raw = {name: load_task(name, cfg.data, cfg.seed) for name in self.task_names}
        for name in train_names:
            if not raw[name].train:
                raise DataError(f"task {name} is in data.tasks but has no training rows; "
                                f"set data.local.{name}.train")
        for name in eval_names:
            if not raw[name].validation and cfg.train.eval_every:
                raise DataError(f"task {name} is evaluated but has no validation (dev) rows; set "
                                f"data.local.{name}.validation, or train.eval_every=0")
        if cfg.data.max_eval_examples:
            for name in eval_names:
                raw[name].validation = raw[name].validation[:cfg.data.max_eval_examples]
                raw[name].test = raw[name].test[:cfg.data.max_eval_examples]
        k = cfg.data.few_shot
        for name in self.task_names:
            t = raw[name]
            shots = (f" (few-shot: {k} {'per class' if t.kind == 'classification' else 'in all'}, seed {cfg.seed})"
                     if k and name in train_names else "")
            self._info(f"task {name} ({t.kind}, {', '.join(t.metrics)}): {len(t.train)} train{shots} / "
                       f"{len(t.validation)} dev / {len(t.test)} test examples")
        self.raw = raw
        self.init_tensors = init_tensors = (load_prompts_file(cfg.prompt.init_file)
                                            if cfg.prompt.init == "file" else None)

        # The checkpoint to resume from, checked (manifest, number of ranks, the config it was
        # written under) before the backbone loads.
        self.resume_tag = (eng.pick_checkpoint(eng.checkpoint_dir(cfg), check=self._check_same_config)
                           if cfg.train.resume == "auto" else None)

        model_path = resolve_model_path(cfg.model.name_or_path, progress=self.is_main)
        # A run that cannot fit in device memory is refused before the weights load.
        fit = eng.check_memory(cfg, ds_config, model_path, self.placement.mode)
        if fit is not None:
            self._info(f"memory estimate: {fit.total / 2**30:.2f} GiB per device ({fit.setup.name}, activation "
                       f"checkpointing {'on' if fit.setup.checkpointing else 'off'}; python -m bpt_ds.plan)")
        # The tokenizer and config are small: tokenize and check the prompt file now, so that
        # over-long labels or a prompt of the wrong shape fail before the backbone loads.
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        d = cfg.data
        self.pad_id = self.tokenizer.pad_token_id
        def encode(name: str, split: str):
            return encode_task(self.tokenizer, raw[name], self.task_names.index(name), split,
                               d.max_source_length, d.max_target_length)

        self.train_tasks = [encode(n, "train") for n in train_names]
        # A task without dev rows (allowed when train.eval_every=0) is not evaluated; the test
        # rows of a task are scored whenever the mean dev score improves.
        self.eval_tasks = [encode(n, "validation") for n in eval_names if raw[n].validation]
        self.test_tasks = [encode(n, "test") for n in eval_names if raw[n].validation and raw[n].test]
        self.sampler = self.make_sampler([len(t.inputs) for t in self.train_tasks])
        p = cfg.prompt
        bank = PromptBank(p.particles, p.length, AutoConfig.from_pretrained(model_path).d_model,
                          tasks=self.task_names, rank=p.factors.rank, factor_init_std=p.factors.init_std)
        if p.init == "file":
            try:
                bank.load_tensors(init_tensors, p.init_file, pick=p.init_particle, factors_from=p.factors.init_from)
            except ValueError as e:
                raise ConfigError(f"prompt.init_file: {e}") from None

        self.check_inputs(bank)
        values = bank.size()
        eng.on_every_rank(lambda: eng.check_free_space(
            self.out, (cfg.train.keep_checkpoints + 1) * eng.checkpoint_bytes_estimate(values) + 3 * 4 * values,
            f"{cfg.train.keep_checkpoints} checkpoint(s) (train.keep_checkpoints), one being written, and the prompt files"))

        # Kept for the whole run: its HfDeepSpeedConfig tells transformers that ZeRO-3 is on.
        self.backbone = backbone = load_backbone(model_path, ds_config, eng.ds_dtype(ds_config),
                                                 progress=self.is_main,
                                                 attn_implementation=cfg.model.attn_implementation)
        if cfg.model.gradient_checkpointing:
            model = backbone.model
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        gen = torch.Generator().manual_seed(cfg.seed)
        if p.init == "random":
            bank.init_random(p.init_std, gen)
        elif p.init == "vocab":
            rows = sample_vocab_embeddings(backbone.model, p.particles * p.length, gen)
            bank.init_rows(rows.view(p.particles, p.length, -1))
        self.after_init(bank)
        self.bank_size = bank.size()
        self.engine = eng.Engine(cfg, self.make_model(backbone.model, bank), ds_config)
        self._check_trainable(backbone.model)
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.row_weight = self.placement.row_weight(ds_config["gradient_accumulation_steps"])

        if self.resume_tag is not None:  # train.resume=auto found one
            state = self.engine.load_checkpoint(self.resume_tag)
            self._check_same_config(state.get("config"))
            self.step = int(state["step"])
            self.best = float(state["best"])
            self.selected = state.get("selected") or {}
            self.evals_without_gain = int(state["evals_without_gain"])
            self.stopped = bool(state["stopped"])
            self.bad_in_row = int(state.get("bad_in_row", 0))
            self.bad_total = int(state.get("bad_total", 0))
            self.checkpoint = str(self.engine.checkpoint_dir() / state["checkpoint"])
            self._info(f"resumed from step {self.step} ({self.checkpoint})")
            # The LR schedule is this run's (over its train.steps), also for the first resumed
            # step; said when that differs from the one the checkpoint was written under.
            note = schedule_note(cfg.train, state.get("schedule_steps"), self.step, *self.engine.follow_schedule())
            if note:
                self._info(note)
        elif cfg.train.resume == "never" and (moved := self.engine.set_aside_checkpoints()) is not None:
            self._info(f"train.resume=never: earlier checkpoints moved to {moved}")
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # Every check has passed and the run continues here: the outputs of an earlier,
            # finished run are no longer this directory's final word (finish writes it anew).
            # A refused command never gets here, so it leaves done.json and the outputs as they were.
            (self.out / DONE_FILE).unlink(missing_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
            eng.atomic_write(self.out / "config.yaml", lambda f: f.write_text(to_yaml(cfg)))
            eng.atomic_write(self.out / "ds_config.json", lambda f: f.write_text(json.dumps(ds_config, indent=2)))
            # purge_step: TensorBoard hides what earlier runs in this directory logged from this
            # run's first step on (steps after the checkpoint it resumes, or every step when it
            # starts at 0), so a restart shows no step twice.
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if self.resume_tag else 0)
            self.writer.add_text("config", "```yaml\n" + to_yaml(cfg) + "\n```", self.step)
            accum = ds_config["gradient_accumulation_steps"]
            self._info(
                f"stage {cfg.stage}: backbone {backbone.path} ({eng.ds_dtype(ds_config)}, frozen), "
                f"{self.world} rank(s), global batch {cfg.train.global_batch_size} = micro "
                f"{self.micro} x accumulation {accum} x ranks {self.world}; "
                f"trainable parameters: {self.bank_size:,} (prompt bank only)")
            self._info(self._placement_line(bank))
        self.prepare()

    def _check_same_config(self, saved: Optional[dict]) -> None:
        """A checkpoint continues only the computation that wrote it. `saved`: the fingerprint in
        its manifest.json (pick_checkpoint, before the backbone loads) or, for checkpoints from
        before manifests carried it, in its client state (after loading). Checkpoints from before
        this check carry none and are trusted."""
        if saved is None:
            return
        now = config_fingerprint(self.cfg)
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
            raise ConfigError(
                f"the checkpoint in {eng.checkpoint_dir(self.cfg)} was written with a different config "
                f"({shown}{', ...' if len(changed) > 6 else ''}); resuming would mix two runs. Use "
                "train.resume=never to start over (the old checkpoints are kept aside), or a new output_dir. "
                f"A resume may change only {', '.join(sorted(RESUME_FREE))}")

    def _placement_line(self, bank) -> str:
        """Where the particles live: which ranks run which, and whether ZeRO-3 partitions them."""
        pl = self.placement
        shape = "x".join(map(str, bank.shape))
        part = getattr(bank.particles, "ds_tensor", None)
        stored = (f"partitioned by ZeRO-3 ({part.numel():,} of {bank.particles.ds_numel:,} values on rank 0)"
                  if part is not None and part.numel() < bank.particles.ds_numel else "stored whole on every rank")
        if pl.mode == "every":
            where = f"every rank runs all {pl.particles} on its share of the batch"
        else:
            where = (f"{pl.examples_per_particle()} examples per particle per step; rank 0 runs particle(s) "
                     f"{pl.local_particles(0)}")
        return f"particles [{shape}]: {where}; {stored}"

    # -------------------------------------------------------- stage hooks
    @classmethod
    def placement_for(cls, cfg: RunConfig, world: int) -> "eng.Placement":
        """Which rows and particles each rank runs; fails on particles that do not fit the ranks
        (run_pipeline calls it for every stage before the first one runs)."""
        return eng.Placement.make(cls.placement_mode, cfg.prompt.particles, world, cfg.train.global_batch_size)

    def adjust_ds_config(self, ds_config: dict) -> None:
        """Stage-specific changes to the resolved DeepSpeed config (saved as ds_config.json)."""

    def make_sampler(self, sizes: list[int]):
        """Which (task, example) pairs make the global batch of each step."""
        sampler = MixtureSampler(sizes, self.cfg.train.global_batch_size, self.cfg.seed)
        if self.cfg.data.group_by_length:
            tasks = self.train_tasks
            sampler = LengthGroupedSampler(sampler, lambda pair: len(tasks[pair[0]].inputs[pair[1]]),
                                           self.cfg.data.group_by_length, self.cfg.seed)
        return sampler

    def make_model(self, backbone, bank: PromptBank) -> PromptedT5:
        """The module DeepSpeed wraps: the frozen backbone with the prompt bank in front."""
        return PromptedT5(backbone, bank)

    def exported(self, tensors: dict) -> dict:
        """The tensors of prompts.safetensors (stage-specific additions)."""
        return tensors

    def check_inputs(self, bank: PromptBank) -> None:
        """Cheap, stage-specific checks of files and values; runs before the backbone loads."""

    def after_init(self, bank: PromptBank) -> None:
        """Stage-specific changes to the initialized prompt bank, before DeepSpeed takes it."""

    def prepare(self) -> None:
        """Stage-specific state once the engine exists (priors, kernels)."""

    def grad_hook(self):
        """A function (theta, grad) -> grad applied to the particles each step, or None."""
        return None

    def extra_scalars(self) -> dict[str, float]:
        """Stage-specific TensorBoard scalars of the latest step."""
        return {}

    def export_extras(self, tensors: dict) -> None:
        """Stage-specific outputs at the end (rank 0 only)."""

    def _check_trainable(self, backbone) -> None:
        """Only the prompt bank may train: a backbone weight with requires_grad is a bug."""
        leaked = [n for n, p in backbone.named_parameters() if p.requires_grad]
        if leaked:
            raise RuntimeError(f"backbone parameters are trainable: {leaked[:5]}")

    def _info(self, message: str) -> None:
        if self.is_main:
            print(f"[bpt_ds] {message}", flush=True)

    # ------------------------------------------------------------------ train
    def batches_at(self, step: int) -> tuple[list, list[dict]]:
        """The global batch of a step (task, example) and this rank's micro-batches of it.

        Each micro-batch carries `loss_units` (each row's target tokens, or 1 under
        loss_unit "example") and `loss_denominator` (the units of the row's particle in the
        whole global batch, the same on every rank), which engine.row_weights turns into row
        weights: exact per-token or per-example means on any ranks and micro-batches."""
        picks = self.sampler.global_batch_at(step)
        lo, hi = self.placement.rank_rows(self.rank)
        row_particles = self.placement.row_particles(self.rank)
        if self.loss_unit == "token":
            units = torch.tensor([len(self.train_tasks[k].targets[i]) for k, i in picks], dtype=torch.long)
        else:
            units = torch.ones(len(picks), dtype=torch.long)
        denominators = self.placement.particle_denominators(units)
        mine = picks[lo:hi]
        micro = []
        for i in range(0, len(mine), self.micro):
            mb = collate(self.train_tasks, mine[i:i + self.micro], self.pad_id)
            if row_particles is not None:
                mb["particle_ids"] = row_particles[i:i + self.micro]
            mb["loss_units"] = units[lo + i:lo + i + self.micro]
            mb["loss_denominator"] = denominators[lo + i:lo + i + self.micro]
            micro.append(mb)
        return picks, micro

    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.is_main, desc=f"{cfg.stage}",
                   dynamic_ncols=True)
        if t.eval_at_start and self.step == 0 and self.eval_tasks:
            self._evaluate()
        window, window_samples, window_tokens = None, 0, 0
        window_start = time.perf_counter()
        self.hook = hook = self.grad_hook()
        while self.step < t.steps and not self.stopped:
            picks, micro = self.batches_at(self.step)
            # Dropout draws depend on (seed, step, rank) only, so a resumed run draws what an
            # uninterrupted one would have.
            torch.manual_seed((cfg.seed * 1_000_003 + self.step) * 1_009 + self.rank)
            stats = self.engine.train_step(micro, self.row_weight, hook)
            self.step += 1
            if self.engine.skipped is not None:
                self._skip_step(self.engine.skipped)
            else:
                self.bad_in_row = 0
                if window is None:
                    window = stats
                else:
                    window.merge(stats)
            window_samples += len(picks)
            window_tokens += sum(len(self.train_tasks[k].inputs[i]) + len(self.train_tasks[k].targets[i])
                                 for k, i in picks)
            if self.step % t.log_every == 0 or self.step == t.steps:
                # (Every rank agrees on skipped steps, so `window` is None on all ranks or on none.)
                reduced = window.reduced() if window is not None else None
                elapsed = time.perf_counter() - window_start
                self._log_train(reduced, window_samples / elapsed, window_tokens / elapsed,
                                self.engine.hook_seconds / elapsed)
                self.engine.hook_seconds = 0.0
                if reduced is not None:
                    bar.set_postfix(loss=f"{reduced[0].mean().item():.4f}")
                window, window_samples, window_tokens = None, 0, 0
                window_start = time.perf_counter()
            bar.update(1)
            if t.eval_every and self.step % t.eval_every == 0 and self.eval_tasks:
                self.stopped = self._evaluate()
            saved = False
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps or self.stopped:
                # `stopped` is saved too: running the command again does not train past an early stop.
                saved = self._save_checkpoint()
            if self.stopped:
                self._info(f"early stop at step {self.step}: no gain in {t.patience} evaluations")
            if self.engine.stop_requested:
                # A rank got SIGTERM or SIGINT; all ranks learned it (and which) in the same step's all-reduce.
                name = eng.signal_name(self.engine.stop_signal)
                if not saved and not self._save_checkpoint():
                    raise eng.SaveError(f"asked to stop ({name}) at step {self.step}, but there was no room for a "
                                        f"checkpoint (see the warning above); the newest checkpoint is "
                                        f"{self.checkpoint or 'none: a rerun starts over'}")
                bar.close()
                raise eng.Preempted(f"stopped at step {self.step} on {name} after saving checkpoint {self.checkpoint}; "
                                    "run the same command again to resume from it (train.resume=auto)",
                                    self.engine.stop_signal)
        bar.close()

    def _save_checkpoint(self) -> bool:
        """Saves the trainable state and the loop's counters (collective); False when there was no
        room (Engine.save_checkpoint), the previous checkpoint then staying the newest."""
        path = self.engine.save_checkpoint(self.step, {
            "step": self.step, "best": self.best, "stopped": self.stopped, "selected": self.selected,
            "evals_without_gain": self.evals_without_gain, "bad_in_row": self.bad_in_row,
            "bad_total": self.bad_total, "config": config_fingerprint(self.cfg),
            # The total the LR schedule runs over: a resume with another train.steps says what changes.
            "schedule_steps": self.cfg.train.steps})
        if path is not None:
            self.checkpoint = str(path)
        return path is not None

    def _skip_step(self, why: str) -> None:
        """A step with a non-finite loss, gradient or SVGD direction (on any rank) was skipped: count it,
        say so, and stop after train.max_bad_steps in a row."""
        self.bad_in_row += 1
        self.bad_total += 1
        limit = self.cfg.train.max_bad_steps
        what = {"loss": "loss", "gradient": "gradient of the prompts", "direction": "SVGD direction"}[why]
        if self.is_main:
            tqdm.write(f"[bpt_ds] warning: step {self.step} skipped: non-finite {what} on some rank "
                       f"({self.bad_in_row} in a row, {self.bad_total} in all; the run stops at "
                       f"train.max_bad_steps={limit} in a row)", file=sys.stderr)
            self.writer.add_scalar("train/skipped_steps", self.bad_total, self.step)
        if self.bad_in_row >= limit:
            raise eng.TrainingHalted(
                f"training stopped at step {self.step}: {self.bad_in_row} steps in a row had a non-finite {what} "
                f"(train.max_bad_steps={limit}; {self.bad_total} skipped in all). Skipped steps do not move the "
                f"prompts. The newest checkpoint is kept: {self.checkpoint or 'none was written yet'}. Lower train.lr "
                "or train.max_grad_norm, check the data and the prompt init file; a rerun resumes from that "
                "checkpoint")

    def _log_train(self, reduced: Optional[tuple], samples_per_s: float, tokens_per_s: float,
                   hook_share: float) -> None:
        """reduced: the window's StepStats.reduced(), or None when every step of it was skipped."""
        if not self.is_main:
            return
        w, s = self.writer, self.step
        w.add_scalar("train/skipped_steps", self.bad_total, s)
        if reduced is not None:
            self._log_losses(*reduced)
        for key, value in self.extra_scalars().items():
            w.add_scalar(key, value, s)
        w.add_scalar("train/lr", self.engine.lr(), s)
        norm = self.engine.grad_norm()
        if norm is not None:
            w.add_scalar("train/grad_norm", norm, s)
        w.add_scalar("perf/samples_per_s", samples_per_s, s)
        w.add_scalar("perf/tokens_per_s", tokens_per_s, s)
        w.add_scalar("perf/peak_memory_mb", eng.peak_memory_mb(), s)
        if self.hook is not None:
            # Share of wall time in the gradient hook: all-gathers of θ and G, SVGD or the prior.
            w.add_scalar("perf/grad_hook_share", hook_share, s)

    def _log_losses(self, loss: torch.Tensor, task_loss: torch.Tensor, terms: Optional[dict] = None) -> None:
        w, s = self.writer, self.step
        w.add_scalar("train/loss", loss.mean().item(), s)
        for name, (mean, per_task) in (terms or {}).items():
            w.add_scalar(f"train/{name}", mean, s)
            for task in self.train_tasks:
                if not torch.isnan(per_task[task.task_id]):
                    w.add_scalar(f"train/{name}/{task.name}", per_task[task.task_id].item(), s)
        if loss.numel() > 1:
            for m, value in enumerate(loss.tolist()):
                w.add_scalar(f"train/loss_particle_{m}", value, s)
        if len(self.train_tasks) > 1:
            for task in self.train_tasks:
                if not torch.isnan(task_loss[task.task_id]):  # mpt-distill: a task may sit out a window
                    w.add_scalar(f"train/loss_task/{task.name}", task_loss[task.task_id].item(), s)

    @property
    def _ensemble(self) -> bool:
        """Evaluation scores the particles' posterior predictive: M > 1 and the stage's rule says so."""
        return self.eval_ensemble and self.cfg.prompt.particles > 1

    @property
    def _scored(self) -> str:
        """What an evaluation scores, in words (the log line says it)."""
        if self._ensemble:
            return f"posterior predictive over {self.cfg.prompt.particles} particles"
        return "each task under its own teacher prompt" if self.cfg.prompt.particles > 1 else "prompt"

    def _scores(self, tasks) -> dict[str, dict]:
        """Every task's metrics (bpt_ds.metrics) on the given split's encoded tasks."""
        d = self.cfg.data
        generate = d.eval_mode == "generate"
        preds = self.engine.predict(tasks, self.cfg.train.eval_batch_size, self.pad_id, ensemble=self._ensemble,
                                    generate=generate, max_new_tokens=d.max_new_tokens)
        out = {}
        for task in tasks:
            p = preds[task.name]
            if generate or task.kind == "qa":
                texts = [t.strip() for t in self.tokenizer.batch_decode(p, skip_special_tokens=True)]
            else:
                texts = [task.labels[i] for i in p]
            golds = [row["answers"] if task.kind == "qa" else row["target"] for row in task.rows]
            groups = [row.get("group") for row in task.rows]
            out[task.name] = compute_metrics(task.metrics, texts, golds, labels=task.labels, groups=groups)
        return out

    def _log_scores(self, split: str, metrics: dict) -> None:
        if not self.is_main:
            return
        for task, values in metrics.items():
            for key, value in values.items():
                if key != "examples":
                    self.writer.add_scalar(f"{split}/{task}/{key}", value, self.step)
        summary = ", ".join(
            f"{task} " + " ".join(f"{k} {x:.4f}" for k, x in v.items() if k not in ("score", "examples", "invalid"))
            + (f" ({v['invalid']} of {v['examples']} predictions invalid)" if v["invalid"] else "")
            for task, v in metrics.items())
        tqdm.write(f"[bpt_ds] step {self.step} {split} ({self._scored}): {summary}")

    def _evaluate(self) -> bool:
        """Scores the dev set; when its mean task score improves, also the test set (the reported
        numbers are the test scores at the best dev step) and prompts_best.safetensors. Returns
        True when early stopping says stop."""
        metrics = self._scores(self.eval_tasks)
        self.last_metrics, self.last_eval_step = metrics, self.step
        self._log_scores("dev", metrics)
        score = sum(v["score"] for v in metrics.values()) / len(metrics)
        if score > self.best:
            self.best, self.evals_without_gain = score, 0
            test = self._scores(self.test_tasks) if self.test_tasks else {}
            if test:
                self._log_scores("test", test)
            self.selected = {"step": self.step, "dev": metrics, "test": test}
            self._save_prompts("prompts_best.safetensors")
        else:
            self.evals_without_gain += 1
        return bool(self.cfg.train.patience) and self.evals_without_gain >= self.cfg.train.patience

    def _save_prompts(self, name: str) -> dict:
        """Gathers the full prompt bank (collective: every rank calls it) and rank 0 writes it to
        output_dir/name atomically; returns the tensors."""
        tensors = self.exported(self.engine.model.bank.export(self.engine.full_trainable_tensors()))
        if self.is_main:
            from safetensors.torch import save_file

            self._write(self.out / name, lambda f: save_file(tensors, str(f)))
        return tensors

    def _write(self, path: Path, write) -> None:
        """An output file, written atomically; on a full or read-only disk retried with the data in memory
        (eng.write_with_retry), for train.save_retry_minutes over the whole run."""
        # The other ranks wait in a collective meanwhile: stay well inside its timeout.
        budget = min(self.cfg.train.save_retry_minutes, self.cfg.deepspeed.timeout_minutes / 2)
        self.retry_minutes_spent += eng.write_with_retry(path, write, max(0.0, budget - self.retry_minutes_spent))

    def results(self) -> dict:
        """metrics.json: the run's identity, the selected (best dev) step's dev and test metrics,
        and the final step's dev metrics."""
        cfg = self.cfg
        return {"method": cfg.method or cfg.stage, "stage": cfg.stage, "seed": cfg.seed,
                "few_shot": cfg.data.few_shot, "selected": self.selected,
                "final": {"step": self.last_eval_step, "dev": self.last_metrics}}

    # ----------------------------------------------------------------- finish
    def finish(self) -> dict:
        if self.eval_tasks and self.last_eval_step != self.step:
            self._evaluate()
        tensors = self._save_prompts("prompts.safetensors")
        if self.is_main:
            self.export_extras(tensors)
            results = self.results()
            self._write(self.out / "metrics.json", lambda f: f.write_text(json.dumps(results, indent=2) + "\n"))
            self.writer.flush()
            # Last: a pipeline skips this stage on a rerun only when this marker matches its config
            # and its input files.
            done = {"step": self.step, "stopped": self.stopped, "fingerprint": config_fingerprint(self.cfg),
                    "inputs": input_digests(self.cfg), "config": to_dict(self.cfg)}
            self._write(self.out / DONE_FILE, lambda f: f.write_text(json.dumps(done, indent=2) + "\n"))
            self._info(f"done at step {self.step}. Outputs in {self.out.resolve()}:")
            self._info(f"  prompts      {self.out / 'prompts.safetensors'}")
            if self.selected:
                self._info(f"  best prompts {self.out / 'prompts_best.safetensors'} (step {self.selected['step']}, "
                           "the step metrics.json reports)")
            self._info(f"  metrics      {self.out / 'metrics.json'}")
            self._info(f"  config       {self.out / 'config.yaml'}")
            self._info(f"  checkpoints  {self.engine.checkpoint_dir()}")
            self._info(f"  TensorBoard  tensorboard --logdir {self.out / 'tb'}")
        eng.barrier()
        return self.results()

    def cleanup(self) -> None:
        """Closes the log and lets go of the engine and backbone, so that the next stage of a
        pipeline does not load its backbone beside this one."""
        if self.writer is not None:
            self.writer.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.ds.destroy()
        self.engine = self.backbone = None
        import gc

        gc.collect()
        if eng.on_gpu():
            from deepspeed.accelerator import get_accelerator

            get_accelerator().empty_cache()
