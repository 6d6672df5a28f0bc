"""Entry point: `deepspeed launch/train.py [--config X.yaml] [key.sub=value ...]`.

With no arguments it runs the embedded default: prompt tuning of the project's tiny T5
on the synthetic `polarity` task (on CPU when there is no GPU).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config or pipeline (see configs/); default: the embedded "
                                          "tiny CPU run")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.steps=300")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from bpt_ds.config import ConfigError, load_runs
    from bpt_ds.data.tasks import DataError

    try:
        runs = load_runs(args.config, args.overrides)  # a pipeline's stages are all checked up front
        from bpt_ds.stages import run_pipeline

        rank0 = os.environ.get("RANK", "0") == "0"
        run_pipeline(runs, say=lambda line: print(line, flush=True) if rank0 else None)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"bpt_ds: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
