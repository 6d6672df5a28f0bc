"""Starting real multi-process jobs from tests: the `deepspeed` launcher on CPU (gloo)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")


def dropout_backbone(tiny: Path, dest: Path, rate: float) -> Path:
    """A copy of the tiny backbone's files at dest with dropout_rate = rate (real T5 checkpoints
    train with dropout; the tiny one has none)."""
    import json

    dest.mkdir()
    for f in Path(tiny).iterdir():
        if f.is_file():
            (dest / f.name).write_bytes(f.read_bytes())
    config = json.loads((dest / "config.json").read_text())
    config["dropout_rate"] = rate
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def ds_env(cache: Path, ranks: int) -> dict:
    env = dict(os.environ)
    env["BPT_DS_CACHE"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "dist"), env.get("PYTHONPATH", "")])
    # Ranks share the CPU cores; more threads than cores makes every rank crawl.
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    return env


def ds_command(ranks: int, script: str, *args: str, port: int = 29600) -> list[str]:
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), script, *args]


def run_ds(ranks: int, script: str, *args: str, cache: Path, cwd: Path | None = None,
           port: int = 29600, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(ds_command(ranks, script, *args, port=port), env=ds_env(cache, ranks), cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
    return proc


def two_node_commands(hostfile: Path, script: str, *args: str, port: int = 29610) -> list[list[str]]:
    """The deepspeed launcher as run on each of two nodes without ssh (launch/slurm.sbatch's
    form): one launcher per node, --node_rank 0 and 1, node 0 at 127.0.0.1. The hostfile names
    the two nodes with one slot each."""
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    return [["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
             "127.0.0.1", "--master_port", str(port), script, *args] for node in (0, 1)]


def start_two_nodes(hostfile: Path, script: str, *args: str, cache: Path, port: int = 29610) -> list[subprocess.Popen]:
    return [subprocess.Popen(cmd, env=ds_env(cache, 2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
            for cmd in two_node_commands(hostfile, script, *args, port=port)]

