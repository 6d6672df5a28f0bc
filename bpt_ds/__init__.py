"""bpt_ds: soft prompts (PT, SPoT, MPT, BMTPT) for frozen T5 models under DeepSpeed ZeRO-3."""
import os as _os

# DeepSpeed picks its accelerator when first imported and, finding no GPU, warns so in every
# process ("Setting accelerator to CPU. If you have GPU ..."), which tells a CPU user nothing.
# Naming the accelerator first keeps it quiet; DS_ACCELERATOR set by the user wins.
if "DS_ACCELERATOR" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["DS_ACCELERATOR"] = "cpu"
