"""Entry point: `deepspeed launch/train.py [--config X.yaml] [key.sub=value ...]`.

With no arguments it runs the embedded default: prompt tuning of the project's tiny T5
on the synthetic `polarity` task (on CPU when there is no GPU).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    code = 1  # an exception that escapes _main
    try:
        code = _main(argv)
        return code
    finally:
        record_exit_code(code)


def record_exit_code(code: int) -> None:
    """With BPT_DS_STATUS_DIR set (launch/slurm.sbatch sets it per node), each rank writes its exit
    code there: the deepspeed launcher's own code says nothing once SIGTERM reached it too."""
    folder = os.environ.get("BPT_DS_STATUS_DIR")
    if folder:
        try:
            with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass


def _main(argv: list[str] | None = None) -> int:
    from bpt_ds.config_keys import render

    parser = argparse.ArgumentParser(description=__doc__, epilog=render(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config or pipeline (see configs/); default: the embedded "
                                          "tiny CPU run")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3: one run (or pipeline) per seed in "
                                         "<output_dir>/seed<N>, then a mean ± std table of them")
    parser.add_argument("--show-config", action="store_true",
                        help="print the resolved config of every run the command would start (YAML) and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.steps=300")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from bpt_ds.distributed import StopFlag, is_comm_failure
    from bpt_ds.errors import ConfigError, DataError, Preempted, SaveError, TrainingHalted
    from bpt_ds.pipeline import run_pipeline
    from bpt_ds.runs import load_runs

    # SIGTERM (preemption, scancel) and SIGINT (Ctrl-C) save a checkpoint at the next step boundary
    # instead of killing; a second Ctrl-C kills at once.
    stop = StopFlag().install()

    rank0 = os.environ.get("RANK", "0") == "0"

    def say(line: str) -> None:
        if rank0:
            print(line, flush=True)

    try:
        seeds = parse_seeds(args.seeds)
        # Every run of every seed is built and checked before the first one starts.
        batches = [load_runs(args.config, args.overrides, seed) for seed in seeds]
        if args.show_config:
            show_config(batches, say)
            return 0
        for seed, runs in zip(seeds, batches):
            if seed is not None:
                say(f"[bpt_ds] seed {seed} ({seeds.index(seed) + 1} of {len(seeds)})")
            run_pipeline(runs, say=say, stop=stop)
        if len(seeds) > 1 and rank0:
            write_seed_table([cfg.output_dir for runs in batches for _, cfg in runs], say)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"bpt_ds: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Preempted as e:
        say(f"[bpt_ds] {e}")
        return EXIT_INTERRUPTED if e.signum == signal.SIGINT else EXIT_PREEMPTED
    except TrainingHalted as e:
        if rank0:  # every rank stops at the same step, for the same reason
            print(f"bpt_ds: error: {e}", file=sys.stderr, flush=True)
        return EXIT_HALTED
    except SaveError as e:
        print(f"bpt_ds: error: {e}", file=sys.stderr, flush=True)
        return EXIT_SAVE_FAILED
    except Exception as e:
        if not is_comm_failure(e):
            raise
        report_lost_ranks(e)
        return EXIT_LOST_RANK
    return 0


# Exit codes (README, "Reliability"): 0 finished; 2 bad input (config, data, files, checkpoints),
# nothing trained; 3 a rank was lost or hung; 4 too many non-finite steps in a row; 5 an output
# could not be written (and where it went instead); 143 stopped by SIGTERM after saving a
# checkpoint (128 + SIGTERM, as schedulers expect of a terminated job), 130 the same on SIGINT
# (Ctrl-C; 128 + SIGINT, as shells report it). Rerun to resume after 3, 4, 130, 143.
EXIT_BAD_INPUT, EXIT_LOST_RANK, EXIT_HALTED, EXIT_SAVE_FAILED, EXIT_PREEMPTED, EXIT_INTERRUPTED = 2, 3, 4, 5, 143, 130


def report_lost_ranks(e: Exception) -> None:
    """A collective failed (a rank died, hung or lost its network): name the ranks that no
    longer answer, and say how to continue."""
    from bpt_ds.distributed import rank, unresponsive_ranks

    me = rank()
    lost = unresponsive_ranks(getattr(e, "timeout_s", 1800.0))
    who = ("rank 0, which hosts the job's store, is unreachable" if lost is None else
           f"rank(s) {', '.join(map(str, lost))} did not answer" if lost else
           "every rank still answers (a network fault?)")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"bpt_ds: error: rank {me}: lost contact with the job: {who}. A collective failed: {first}\n"
          "bpt_ds: a rank that dies or hangs ends the job after deepspeed.timeout_minutes; look above for "
          "that rank's own error, then rerun the same command: it resumes from the newest checkpoint "
          "(train.resume=auto).", file=sys.stderr, flush=True)


def show_config(batches, say) -> None:
    """The YAML of every run a command would start, in order, each under a comment naming it."""
    from bpt_ds.config import to_yaml

    for runs in batches:
        for name, cfg in runs:
            say(f"# run '{name}': stage {cfg.stage}, output_dir {cfg.output_dir}")
            say(to_yaml(cfg).rstrip() + "\n")


def parse_seeds(text: str | None) -> list:
    from bpt_ds.config import ConfigError

    if text is None:
        return [None]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers such as 1,2,3; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds expects distinct integers such as 1,2,3; got {text!r}")
    return seeds


def write_seed_table(run_dirs: list[str], say) -> None:
    """The seeds' mean ± std table, printed and written next to the runs as results.md."""
    from pathlib import Path

    from bpt_ds.results import ResultsError, render

    root = Path(os.path.commonpath([os.path.abspath(d) for d in run_dirs]))
    try:
        table = render(run_dirs)
    except ResultsError as e:
        say(f"[bpt_ds] no results table: {e}")
        return
    (root / "results.md").write_text(table)
    say(f"[bpt_ds] test scores over seeds (x100, mean ± std; {root / 'results.md'}):\n{table}")


if __name__ == "__main__":
    code = main()
    # Everything is written and closed. Exempt the millions of torch/transformers objects from
    # the collector's passes at interpreter exit: that takes the exit from ~1.3 s to ~0.2 s.
    import gc

    gc.freeze()
    sys.exit(code)
