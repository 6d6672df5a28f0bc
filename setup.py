from setuptools import find_packages, setup

setup(
    name="bpt_ds",
    version="0.1.0",
    description="Soft prompts (PT, SPoT, MPT, BMTPT) for frozen T5 models under DeepSpeed ZeRO-3",
    packages=find_packages(include=["bpt_ds", "bpt_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Tested: torch 2.13 (CPU) here; the GPU image ships torch 2.11.
        "torch>=2.4,<2.14",
        # >= 0.19.3: earlier releases break non-reentrant activation checkpointing with
        # frozen weights under ZeRO-3. Tested: 0.19.8.
        "deepspeed>=0.19.3,<0.20",
        # 5.x; its HfDeepSpeedConfig needs accelerate. Tested: 5.23.
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0,<6",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "filelock>=3.0",
        "numpy>=1.24",
        # Metrics (F1, Matthews, Pearson/Spearman) of the task suite.
        "scikit-learn>=1.3",
        "scipy>=1.10",
        # python -m bpt_ds.results --plot, and the benchmarks' pictures.
        "matplotlib>=3.7",
    ],
    extras_require={
        # Hugging Face peft: export / import of prompt adapters (python -m bpt_ds.peft_io). Tested: 0.21.
        "peft": ["peft>=0.13"],
        # Trackers beside TensorBoard (report_to=[tensorboard,wandb,mlflow]). Tested: wandb 0.31,
        # mlflow-skinny 3.18 (the tracking client without the server).
        "wandb": ["wandb>=0.17"],
        "mlflow": ["mlflow-skinny>=2.10"],
        # hypothesis: property-based tests of bad input (tests/test_properties.py).
        "test": ["pytest>=8", "peft>=0.13", "hypothesis>=6.100", "wandb>=0.17", "mlflow-skinny>=2.10"],
    },
)
