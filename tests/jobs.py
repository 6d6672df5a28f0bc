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


def job_command(ranks: int, script: str, *args: str, port: int = 29600, launcher: str = "auto") -> list[str]:
    """How run_ds starts a job. launcher="deepspeed": the deepspeed launcher, as the README runs
    it. "auto": a job of one is a plain `python script` (a job of one, as launch/train.py makes
    it), more ranks start under torchrun (as launch/torchrun.sh does). The deepspeed launcher
    costs ~8 s a job (measured: 15-16 s for a 1-step run, 6.5 s under torchrun, 7.6 s plain), in
    two extra interpreters that import torch and DeepSpeed, and passes the failed rank's exit
    code where torchrun returns 1; the tests about launching, exit codes and signals name it."""
    if launcher == "deepspeed":
        return ds_command(ranks, script, *args, port=port)
    if launcher != "auto":
        raise ValueError(f"launcher {launcher!r}")
    if ranks == 1:
        return [sys.executable, script, *args]
    return ["torchrun", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(port),
            script, *args]


def run_ds(ranks: int, script: str, *args: str, cache: Path, cwd: Path | None = None,
           port: int = 29600, timeout: int = 600, launcher: str = "auto") -> subprocess.CompletedProcess:
    """A real job of `ranks` processes (job_command), its output captured."""
    proc = subprocess.run(job_command(ranks, script, *args, port=port, launcher=launcher), env=ds_env(cache, ranks),
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
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


def step_zero_batch(overrides: list[str], cache: Path):
    """What a run of these overrides trains on at step 0, built without DeepSpeed: (config, the
    tiny backbone's path, its tokenizer, the encoded training tasks, the global batch [(task, example)])."""
    from transformers import AutoTokenizer

    from bpt_ds.data.batching import MixtureSampler, encode_task
    from bpt_ds.data.tasks import load_task
    from bpt_ds.runs import load_config

    cfg = load_config(None, overrides)
    path = next(cache.glob("tiny-t5-*/"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tasks = [encode_task(tokenizer, load_task(n, cfg.data, cfg.seed), i, "train", cfg.data.max_source_length,
                         cfg.data.max_target_length) for i, n in enumerate(cfg.data.tasks)]
    picks = MixtureSampler([len(t.inputs) for t in tasks], cfg.train.global_batch_size, cfg.seed).global_batch_at(0)
    return cfg, path, tokenizer, tasks, picks


def signal_when(cmd: list[str], env: dict, log: Path, ready, target, sig: int) -> tuple[int, str]:
    """Starts cmd in its own session (output to log), waits (up to 5 minutes) until ready(log
    text) or the job ends, sends sig to target(job) (a Popen or psutil.Process), and waits for the
    job to end on its own (within 2 minutes). Returns its exit code and output."""
    import signal as signals
    import time

    with open(log, "w") as sink:
        job = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and job.poll() is None and not ready(log.read_text()):
                time.sleep(0.1)
            target(job).send_signal(sig)
            rc = job.wait(timeout=120)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signals.SIGKILL)
    return rc, log.read_text()


def stopped_on(text: str, signame: str, rank: int) -> tuple[int, str]:
    """Asserts that a job's output says rank `rank` got `signame` and the job stopped after saving
    a checkpoint (both lines word for word); returns (the step it stopped at, the checkpoint)."""
    import re

    again = " (Ctrl-C again stops at once, without saving)" if signame == "SIGINT" else ""
    assert (f"[bpt_ds] rank {rank}: {signame} received; a checkpoint will be saved at the next step boundary, "
            f"then the run stops{again}") in text, text[-3000:]
    stop = re.search(rf"\[bpt_ds\] stopped at step (\d+) on {signame} after saving checkpoint (\S+); run the same "
                     r"command again to resume from it \(train.resume=auto\)", text)
    assert stop, text[-3000:]
    return int(stop.group(1)), stop.group(2)
