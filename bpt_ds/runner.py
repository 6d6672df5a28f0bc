"""The recipe: one stage of training, read top to bottom. `run_stage(cfg, stage)` builds the
components for the run (setup), runs the loop (train), and writes the outputs (finish).

The stage (bpt_ds/stages) says what differs between methods; the components do the work and
never call back into this file:
    distributed      joining the job, rank helpers, the stop flag (SIGTERM, SIGINT)
    deepspeed_setup  the resolved DeepSpeed config, the memory check, deepspeed.initialize
    step             Placement, micro-batches and their loss weights, one optimizer step
    evaluation       sharded predictions, metrics, best-dev selection and patience
    checkpoints      TrainState, the checkpoint to resume, atomic saves
    files, report    atomic output files; lines and TensorBoard

Outputs in output_dir: config.yaml, ds_config.json (the resolved DeepSpeed config),
prompts.safetensors (final), prompts_best.safetensors (best dev score), metrics.json (dev and
test metrics of the best dev step, bpt_ds.metrics), done.json (written last), tb/ (TensorBoard),
checkpoints/.
"""
from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from . import distributed as job
from .backbone import load_backbone, resolve_model_path, sample_vocab_embeddings
from .checkpoints import (Checkpointer, TrainState, check_same_config, checkpoint_bytes_estimate, checkpoint_dir,
                          pick_checkpoint)
from .config import RunConfig, config_fingerprint, steps_for_epochs, to_dict, to_yaml
from .data.run_data import RunData
from .deepspeed_setup import check_memory, ds_dtype, initialize, resolve_ds_config, schedule_note
from .errors import ConfigError, LostContact, Preempted, SaveError, TrainingHalted
from .evaluation import Evaluator, hparam_metrics, select, what_is_scored
from .plan import dims_from_config, param_counts
from .files import DONE_FILE, atomic_write, check_free_space, check_writable, utc_stamp, write_with_retry
from .prompts import PromptBank, load_prompts_file
from .report import Reporter
from .stages.base import Stage
from .step import SkipReason, Stepper, micro_batches, placement_line
from .trackers import Ledger, check_available, open_trackers, set_aside_tracker_runs
from .train_log import TrainLog, flops_counter, job_peak_flops


def run_stage(cfg: RunConfig, stage: Stage, stop: Optional[job.StopFlag] = None) -> dict:
    """Trains one stage to its end (or its early stop) and returns metrics.json's content."""
    runner = Runner(cfg, stage, stop)
    outcome = "failed"  # how the run ended, for the trackers' status
    try:
        runner.setup()
        runner.train()
        metrics = runner.finish()
        outcome = "finished"
        return metrics
    except (Preempted, KeyboardInterrupt):
        outcome = "killed"
        raise
    except Exception as e:
        if getattr(getattr(runner, "stepper", None), "stop_requested", False):
            outcome = "killed"  # asked to stop by a signal (and, e.g., no room for its checkpoint)
        if job.is_comm_failure(e) and not isinstance(e, LostContact):
            # launch/train.py names the lost rank, waiting for it as long as this run's collectives do.
            raise LostContact(str(e) or type(e).__name__, cfg.deepspeed.timeout_minutes * 60) from e
        raise
    finally:
        runner.cleanup(outcome)


class Runner:
    """One stage's run: setup builds the components (every rank alike), train runs the loop from
    state.step (0, or the resumed checkpoint's), finish writes the outputs, cleanup lets go of
    DeepSpeed and the backbone. stop: the process's stop flag (SIGTERM, SIGINT)."""

    def __init__(self, cfg: RunConfig, stage: Stage, stop: Optional[job.StopFlag] = None):
        self.cfg, self.stage = cfg, stage
        self.stop = stop or job.StopFlag()
        self.out = Path(cfg.output_dir)
        self.state = TrainState()
        self.deepspeed = self.checkpointer = self.backbone = None
        self.retry_minutes_spent = 0.0  # waiting for a full or read-only disk (write)
        self.last_metrics: dict = {}
        self.last_eval_step = -1

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything that can fail on bad input fails here, before the backbone loads."""
        cfg, stage = self.cfg, self.stage
        job.init_distributed(cfg.deepspeed.timeout_minutes)
        self.rank, self.world = job.rank(), job.world_size()
        self.report = report = Reporter(self.rank == 0)
        check_available(cfg.report_to)  # a tracker that is not installed fails now, not after the backbone
        torch.manual_seed(cfg.seed)
        self.ds_config = ds_config = resolve_ds_config(cfg, self.world)
        if not stage.clip_jointly:
            ds_config["gradient_clipping"] = 0.0
        self.placement = stage.placement(cfg, self.world)
        # Every rank writes checkpoint shards: an output_dir it cannot write fails now, not at step save_every.
        job.on_every_rank(lambda: check_writable(self.out))

        # Data and the init file first: bad input fails before the backbone is loaded.
        self.data = data = RunData.load(cfg, report.info)
        if cfg.train.epochs is not None:
            self._steps_from_epochs(data.train_examples)
            cfg = self.cfg
        init_tensors = load_prompts_file(cfg.prompt.init_file) if cfg.prompt.init == "file" else None
        # The checkpoint to resume from, checked (manifest, number of ranks, the config it was
        # written under) before the backbone loads.
        self.resume_tag = (pick_checkpoint(checkpoint_dir(cfg), check=lambda saved: check_same_config(cfg, saved))
                           if cfg.train.resume == "auto" else None)

        self.backbone_path = model_path = resolve_model_path(cfg.model.name_or_path, progress=report.is_main)
        # A run that cannot fit in device memory is refused before the weights load.
        fit = check_memory(cfg, ds_config, model_path, self.placement.mode)
        if fit is not None:
            report.info(f"memory estimate: {fit.total / 2**30:.2f} GiB per device ({fit.setup.name}, activation "
                        f"checkpointing {'on' if fit.setup.checkpointing else 'off'}; python -m bpt_ds.plan)")
        # The tokenizer and config are small: tokenize and check the prompt file now, so that
        # over-long labels or a prompt of the wrong shape fail before the backbone loads.
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id
        data.encode(self.tokenizer, cfg.data.max_source_length, cfg.data.max_target_length, report.warn)
        self.train_tasks, self.eval_tasks, self.test_tasks = data.train_tasks, data.eval_tasks, data.test_tasks
        self.sampler = stage.sampler([len(t.inputs) for t in self.train_tasks],
                                     lambda pair: len(self.train_tasks[pair[0]].inputs[pair[1]]))
        backbone_config = AutoConfig.from_pretrained(model_path)
        self.dims = dims_from_config(backbone_config)
        bank = self._prompt_bank(backbone_config.d_model, init_tensors)
        stage.read_inputs(bank, data.train_examples, init_tensors,
                          train_tokens=sum(len(y) for task in self.train_tasks for y in task.targets))
        values = bank.size()
        job.on_every_rank(lambda: check_free_space(
            self.out, (cfg.train.keep_checkpoints + 1) * checkpoint_bytes_estimate(values) + 3 * 4 * values,
            f"{cfg.train.keep_checkpoints} checkpoint(s) (train.keep_checkpoints), one being written, and the prompt files"))

        # Kept for the whole run: its HfDeepSpeedConfig tells transformers that ZeRO-3 is on.
        self.backbone = backbone = load_backbone(model_path, ds_config, ds_dtype(ds_config), progress=report.is_main,
                                                 attn_implementation=cfg.model.attn_implementation)
        if cfg.model.gradient_checkpointing:
            self._enable_activation_checkpointing(backbone.model)
        self._init_prompts(bank, backbone.model)
        for warning in stage.init_bank(bank):
            report.warn(warning)
        self.bank_size = bank.size()
        self.deepspeed = initialize(cfg, stage.model(backbone.model, bank), ds_config)
        _check_frozen(backbone.model)
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.row_weight = self.placement.row_weight(ds_config["gradient_accumulation_steps"])
        self.checkpointer = Checkpointer(self.deepspeed.ds, checkpoint_dir(cfg), cfg.train.keep_checkpoints,
                                         self.bank_size)
        self.transform = stage.grad_transform(self.deepspeed.device)
        self.stepper = Stepper(self.deepspeed, self.transform, self.stop)
        ensemble, scored = what_is_scored(stage.eval_ensemble, cfg.prompt.particles)
        self.evaluator = Evaluator(self.deepspeed, self.tokenizer, cfg.data, cfg.train.eval_batch_size, ensemble,
                                   scored, report)

        if self.resume_tag is not None:  # train.resume=auto found one
            self._resume(self.resume_tag)
        elif cfg.train.resume == "never" and (moved := self.checkpointer.set_aside()) is not None:
            report.info(f"train.resume=never: earlier checkpoints moved to {moved}")
        self._start_outputs(bank)
        for text in stage.describe(bank):
            report.info(text)

    def _steps_from_epochs(self, examples: int) -> None:
        t = self.cfg.train
        steps = steps_for_epochs(t.epochs, examples, t.global_batch_size)
        self.report.info(f"train.epochs={t.epochs:g}: {steps} steps of {t.global_batch_size} examples over "
                         f"{examples:,} training examples (train.steps={t.steps} is not used)")
        self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(t, steps=steps))
        self.stage.cfg = self.cfg

    def _prompt_bank(self, d_model: int, init_tensors: Optional[dict]) -> PromptBank:
        p = self.cfg.prompt
        bank = PromptBank(p.particles, p.length, d_model, tasks=self.data.task_names, rank=p.factors.rank,
                          factor_init_std=p.factors.init_std)
        if p.init == "file":
            try:
                bank.load_tensors(init_tensors, p.init_file, pick=p.init_particle, factors_from=p.factors.init_from)
            except ValueError as e:
                raise ConfigError(f"prompt.init_file: {e}") from None
        return bank

    def _init_prompts(self, bank: PromptBank, backbone) -> None:
        p = self.cfg.prompt
        gen = torch.Generator().manual_seed(self.cfg.seed)
        if p.init == "random":
            bank.init_random(p.init_std, gen)
        elif p.init == "vocab":
            rows = sample_vocab_embeddings(backbone, p.particles * p.length, gen)
            bank.init_rows(rows.view(p.particles, p.length, -1))

    @staticmethod
    def _enable_activation_checkpointing(model) -> None:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _resume(self, tag: str) -> None:
        self.state, saved = self.checkpointer.load(tag)
        check_same_config(self.cfg, saved.get("config"))
        by = self.checkpointer.written_by
        self.report.info(f"resumed from step {self.state.step} ({self.checkpointer.newest}"
                         + (f"; written by {by} rank(s), loaded from its rank-independent state" if by not in (None, self.world)
                            else "") + ")")
        # The LR schedule is this run's (over its train.steps), also for the first resumed step;
        # said when that differs from the one the checkpoint was written under.
        note = schedule_note(self.cfg.train, saved.get("schedule_steps"), self.state.step,
                             *self.deepspeed.follow_schedule())
        if note:
            self.report.info(note)

    def _start_outputs(self, bank: PromptBank) -> None:
        cfg, report = self.cfg, self.report
        if report.is_main:
            # Every check has passed and the run continues here: the outputs of an earlier,
            # finished run are no longer this directory's final word (finish writes it anew).
            # A refused command never gets here, so it leaves done.json and the outputs as they were.
            (self.out / DONE_FILE).unlink(missing_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.yaml", lambda f: f.write_text(to_yaml(cfg)))
            atomic_write(self.out / "ds_config.json", lambda f: f.write_text(json.dumps(self.ds_config, indent=2)))
        # purge_step: TensorBoard hides what earlier runs in this directory logged from this run's
        # first step on (steps after the checkpoint it resumes, or every step when it starts at 0),
        # so a restart shows no step twice.
        if "tensorboard" in cfg.report_to:
            report.open_tensorboard(self.out / "tb", purge_step=self.state.step + 1 if self.resume_tag else 0)
        if report.is_main:
            if self.resume_tag is None:  # step 0: a new computation, new tracker runs
                set_aside_tracker_runs(self.out, utc_stamp())
            report.open_trackers(open_trackers(cfg.report_to, self.out, self.out.name, to_dict(cfg)), Ledger(self.out))
        report.text("config", "```yaml\n" + to_yaml(cfg) + "\n```", self.state.step)
        accum = self.ds_config["gradient_accumulation_steps"]
        report.info(f"stage {cfg.stage}: backbone {self.backbone.path} ({ds_dtype(self.ds_config)}, frozen), "
                    f"{self.world} rank(s), global batch {cfg.train.global_batch_size} = micro "
                    f"{self.micro} x accumulation {accum} x ranks {self.world}; "
                    f"trainable parameters: {self.bank_size:,} (prompt bank only)")
        report.info(placement_line(self.placement, bank))
        report.scalars({"model/trainable_parameters": self.bank_size,
                        "model/trainable_share": self.bank_size / param_counts(self.dims)[0]}, self.state.step)

    # ------------------------------------------------------------------ train
    def batches_at(self, step: int) -> tuple[list, list[dict]]:
        """The global batch of a step [(task, example)] and this rank's micro-batches of it."""
        picks = self.sampler.global_batch_at(step)
        return picks, micro_batches(picks, self.placement, self.rank, self.micro, self.stage.loss_unit,
                                    self.train_tasks, self.pad_id)

    def train(self) -> None:
        cfg, t, state = self.cfg, self.cfg.train, self.state
        bar = tqdm(total=t.steps, initial=state.step, disable=not self.report.is_main, desc=f"{cfg.stage}",
                   dynamic_ncols=True)
        if t.eval_at_start and state.step == 0 and self.eval_tasks:
            self.evaluate()
        log = TrainLog(self.report, self.train_tasks, flops_counter(self.dims, cfg.prompt.length,
                                                                    self.placement.particles_per_example,
                                                                    self.train_tasks), job_peak_flops(self.world))
        while state.step < t.steps and not state.stopped:
            picks, micro = self.batches_at(state.step)
            # Dropout draws depend on (seed, step, rank) only, so a resumed run draws what an
            # uninterrupted one would have.
            torch.manual_seed((cfg.seed * 1_000_003 + state.step) * 1_009 + self.rank)
            stats = self.stepper.step(micro, self.row_weight)
            state.step += 1
            if self.stepper.skipped is not None:
                self._skip_step(self.stepper.skipped)
            else:
                state.bad_in_row = 0
                log.add(stats)
            log.count(picks)
            if state.step % t.log_every == 0 or state.step == t.steps:
                loss = log.write(state.step, state.bad_total, self.deepspeed, self.stepper)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            if t.eval_every and state.step % t.eval_every == 0 and self.eval_tasks:
                state.stopped = self.evaluate()
            saved = False
            if (t.save_every and state.step % t.save_every == 0) or state.step == t.steps or state.stopped:
                # `stopped` is saved too: running the command again does not train past an early stop.
                saved = self.save_checkpoint()
            if state.stopped:
                self.report.info(f"early stop at step {state.step}: no gain in {t.patience} evaluations")
            if self.stepper.stop_requested:
                bar.close()
                self._stop_on_signal(saved)
        bar.close()

    def _stop_on_signal(self, saved: bool) -> None:
        """A rank got SIGTERM or SIGINT; all ranks learned it (and which) in the same step's all-reduce."""
        name = job.signal_name(self.stepper.stop_signal)
        step, newest = self.state.step, self.checkpointer.newest
        if not saved and not self.save_checkpoint():
            raise SaveError(f"asked to stop ({name}) at step {step}, but there was no room for a checkpoint (see "
                            f"the warning above); the newest checkpoint is {newest or 'none: a rerun starts over'}")
        raise Preempted(f"stopped at step {step} on {name} after saving checkpoint {self.checkpointer.newest}; "
                        "run the same command again to resume from it (train.resume=auto)", self.stepper.stop_signal)

    def save_checkpoint(self) -> bool:
        """Saves the trainable state and the loop's state (collective); False when there was no
        room (Checkpointer.save), the previous checkpoint then staying the newest."""
        return self.checkpointer.save(self.state, config_fingerprint(self.cfg), self.cfg.train.steps) is not None

    def _skip_step(self, why: SkipReason) -> None:
        """A step with a non-finite loss, gradient or SVGD direction (on any rank) was skipped: count it,
        say so, and stop after train.max_bad_steps in a row."""
        state, limit = self.state, self.cfg.train.max_bad_steps
        state.bad_in_row += 1
        state.bad_total += 1
        what = why.describe()
        self.report.warn(f"step {state.step} skipped: non-finite {what} on some rank ({state.bad_in_row} in a row, "
                         f"{state.bad_total} in all; the run stops at train.max_bad_steps={limit} in a row)")
        self.report.scalar("train/skipped_steps", state.bad_total, state.step)
        if state.bad_in_row >= limit:
            raise TrainingHalted(
                f"training stopped at step {state.step}: {state.bad_in_row} steps in a row had a non-finite {what} "
                f"(train.max_bad_steps={limit}; {state.bad_total} skipped in all). Skipped steps do not move the "
                f"prompts. The newest checkpoint is kept: {self.checkpointer.newest or 'none was written yet'}. "
                "Lower train.lr or train.max_grad_norm, check the data and the prompt init file; a rerun resumes "
                "from that checkpoint")

    def evaluate(self) -> bool:
        """Scores the dev set; when its mean task score improves, also the test set (the reported
        numbers are the test scores at the best dev step) and prompts_best.safetensors. Returns
        True when early stopping says stop."""
        ev, step = self.evaluator, self.state.step
        dev = ev.scores(self.eval_tasks)
        self.last_metrics, self.last_eval_step = dev, step
        ev.log("dev", dev, step)

        def test() -> dict:
            scores = ev.scores(self.test_tasks) if self.test_tasks else {}
            if scores:
                ev.log("test", scores, step)
            return scores

        improved, stop = select(self.state, dev, test, self.cfg.train.patience)
        if improved:
            self.save_prompts("prompts_best.safetensors")
        return stop

    # ----------------------------------------------------------------- finish
    def finish(self) -> dict:
        state, report = self.state, self.report
        if self.eval_tasks and self.last_eval_step != state.step:
            self.evaluate()
        tensors = self.save_prompts("prompts.safetensors")
        results = self.results()
        if report.is_main:
            for rows, metadata, tag, header in self.stage.embeddings(tensors):
                report.embedding(rows, metadata, tag, state.step, header)
            self.write(self.out / "metrics.json", lambda f: f.write_text(json.dumps(results, indent=2) + "\n"))
            report.hparams(to_dict(self.cfg), hparam_metrics(state.selected), state.step)
            report.flush()
            # Last: a pipeline skips this stage on a rerun only when this marker matches its config
            # and its input files.
            done = {"step": state.step, "stopped": state.stopped, "train_examples": self.data.train_examples,
                    "backbone": str(self.backbone_path),
                    "fingerprint": config_fingerprint(self.cfg),
                    "inputs": type(self.stage).input_digests(self.cfg), "config": to_dict(self.cfg)}
            self.write(self.out / DONE_FILE, lambda f: f.write_text(json.dumps(done, indent=2) + "\n"))
            report.info(f"done at step {state.step}. Outputs in {self.out.resolve()}:")
            report.info(f"  prompts      {self.out / 'prompts.safetensors'}")
            if state.selected:
                report.info(f"  best prompts {self.out / 'prompts_best.safetensors'} (step {state.selected['step']}, "
                            "the step metrics.json reports)")
            report.info(f"  metrics      {self.out / 'metrics.json'}")
            report.info(f"  config       {self.out / 'config.yaml'}")
            report.info(f"  checkpoints  {self.checkpointer.root}")
            report.info(f"  TensorBoard  tensorboard --logdir {self.out / 'tb'}")
        job.barrier()
        return results

    def results(self) -> dict:
        """metrics.json: the run's identity, the selected (best dev) step's dev and test metrics,
        and the final step's dev metrics."""
        cfg = self.cfg
        return {"method": cfg.method or cfg.stage, "stage": cfg.stage, "seed": cfg.seed,
                "few_shot": cfg.data.few_shot, "selected": self.state.selected,
                "final": {"step": self.last_eval_step, "dev": self.last_metrics}}

    def save_prompts(self, name: str) -> dict:
        """Gathers the full prompt bank (collective: every rank calls it) and rank 0 writes it to
        output_dir/name atomically; returns the tensors."""
        model = self.deepspeed.model
        tensors = self.stage.exported(model.bank.export(self.deepspeed.full_trainable_tensors()))
        if self.report.is_main:
            from safetensors.torch import save_file

            self.write(self.out / name, lambda f: save_file(tensors, str(f)))
        return tensors

    def write(self, path: Path, write) -> None:
        """An output file, written atomically; on a full or read-only disk retried with the data in memory
        (files.write_with_retry), for train.save_retry_minutes over the whole run."""
        # The other ranks wait in a collective meanwhile: stay well inside its timeout.
        budget = min(self.cfg.train.save_retry_minutes, self.cfg.deepspeed.timeout_minutes / 2)
        self.retry_minutes_spent += write_with_retry(path, write, max(0.0, budget - self.retry_minutes_spent))

    def cleanup(self, outcome: str = "finished") -> None:
        """Closes the log (outcome: how the run ended, for the trackers) and lets go of the engine
        and backbone, so that the next stage of a pipeline does not load its backbone beside this one."""
        report = getattr(self, "report", None)
        if report is not None:
            report.close(outcome)
        if self.deepspeed is not None:
            self.deepspeed.destroy()
        self.deepspeed = self.backbone = None
        gc.collect()
        if job.on_gpu():
            from deepspeed.accelerator import get_accelerator

            get_accelerator().empty_cache()


def _check_frozen(backbone) -> None:
    """Only the prompt bank may train: a backbone weight with requires_grad is a bug."""
    leaked = [n for n, p in backbone.named_parameters() if p.requires_grad]
    if leaked:
        raise RuntimeError(f"backbone parameters are trainable: {leaked[:5]}")
