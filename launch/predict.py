"""Entry point: `deepspeed launch/predict.py --prompts RUN_DIR [--task NAME] [--input FILE] ...`:
one prediction per input row, in input order (python -m bpt_ds.predict --help lists the options)."""
from __future__ import annotations

import sys

from bpt_ds.predict import main

if __name__ == "__main__":
    sys.exit(main())
