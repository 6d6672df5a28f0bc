"""bpt_ds: soft prompts (PT, SPoT, MPT, BMTPT) for frozen T5 models under DeepSpeed ZeRO-3."""
import os as _os

# DeepSpeed picks its accelerator when first imported and, finding no GPU, warns so in every
# process ("Setting accelerator to CPU. If you have GPU ..."), which tells a CPU user nothing.
# Naming the accelerator first keeps it quiet; DS_ACCELERATOR set by the user wins.
if "DS_ACCELERATOR" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["DS_ACCELERATOR"] = "cpu"


def _install_autotuner_mlflow_guard() -> None:
    """DeepSpeed's autotuner, which bpt_ds never runs, imports mlflow when DeepSpeed is imported
    (deepspeed.runtime.config -> deepspeed.autotuning), if mlflow is installed: 1.2 s of every
    process start, on every rank (measured: `import deepspeed` 2.65 s with mlflow-skinny 3.18
    installed, 1.46 s without). This finder refuses that one import, which the autotuner expects
    to fail; any other `import mlflow` (report_to=[mlflow], bpt_ds.trackers) is left alone."""
    import importlib.abc
    import sys

    class AutotunerMlflowGuard(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "mlflow":
                return None
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_globals.get("__name__") == "deepspeed.autotuning.autotuner":
                    raise ModuleNotFoundError("mlflow is not imported for DeepSpeed's autotuner (bpt_ds)", name=name)
                frame = frame.f_back
            return None

    if not any(type(f).__name__ == "AutotunerMlflowGuard" for f in sys.meta_path):
        sys.meta_path.insert(0, AutotunerMlflowGuard())


_install_autotuner_mlflow_guard()
