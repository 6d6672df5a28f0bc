"""A rank that hangs in a multi-node job (simulated on one machine: two deepspeed launchers,
--no_ssh, --node_rank 0 and 1) ends the job with a clear message instead of hanging. The
launch scripts' equivalence with a single-node run is in test_distributed.py."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from jobs import ROOT, TRAIN, start_two_nodes
from test_distributed import SHORT_RUN

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def cache(tiny_backbone_path) -> Path:
    return Path(tiny_backbone_path).parent


def finish(jobs: list[subprocess.Popen], timeout: int = 600) -> list[tuple[int, str, str]]:
    out = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=timeout)
        out.append((job.returncode, stdout, stderr))
    return out


def test_a_hung_node_ends_the_job_with_the_lost_rank_named(cache, tmp_path):
    out = tmp_path / "run"
    jobs = start_two_nodes(tmp_path / "hostfile", TRAIN, f"output_dir={out}", *SHORT_RUN, "train.steps=100000",
                           "train.save_every=2", "deepspeed.timeout_minutes=0.15", cache=cache, port=29612)
    node0, node1 = jobs
    try:
        latest = out / "checkpoints" / "latest"
        deadline = time.time() + 300
        while not latest.is_file() and time.time() < deadline and node0.poll() is None:
            time.sleep(0.2)
        assert latest.is_file(), "the job never wrote a checkpoint"
        # Node 1's rank stops answering (SIGSTOP: alive, connections open, never replies).
        rank1 = [p for p in psutil.Process(node1.pid).children(recursive=True)
                 if "--local_rank=0" in " ".join(p.cmdline())]
        assert len(rank1) == 1
        stopped_at = time.time()
        rank1[0].send_signal(signal.SIGSTOP)
        code, stdout, stderr = finish([node0], timeout=240)[0]
        waited = time.time() - stopped_at
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        finish(jobs)
    assert code != 0
    # The collective times out after 0.15 min (9 s), then rank 0 waits a few seconds for
    # check-ins; the launcher ends the job: no hang.
    assert waited < 120
    assert ("bpt_ds: error: rank 0: lost contact with the job: rank(s) 1 did not answer. A collective failed: "
            in stderr), stderr[-3000:]
    assert "rerun the same command: it resumes from the newest checkpoint (train.resume=auto)" in stderr


def test_pdsh_script_passes_arguments_and_environment_to_the_launcher(tmp_path):
    """launch/multinode.sh with a stand-in `deepspeed` that records what it was given."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    (bin_dir / "deepspeed").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_OUT.args"\n'
                                       'cp "$DS_ENV_FILE" "$FAKE_OUT.env"\necho "$DS_ENV_FILE" > "$FAKE_OUT.path"\n')
    (bin_dir / "deepspeed").chmod(0o755)
    (home / ".deepspeed_env").write_text("# mine\nMY_SETTING=on\n\n")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the cluster\nnode-a slots=2\nnode-b slots=2\n")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(home),
               FAKE_OUT=str(tmp_path / "got"), BPT_DS_CACHE="/shared/cache dir")
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(ROOT / "launch/multinode.sh"), str(hostfile), "--config", "my config.yaml",
                           "train.steps=3"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "got.args").read_text().splitlines() == [
        "--hostfile", str(hostfile.resolve()), "--master_addr", "node-a", "--master_port", "29500",
        "launch/train.py", "--config", "my config.yaml", "train.steps=3"]
    lines = (tmp_path / "got.env").read_text().splitlines()
    assert lines[0] == "MY_SETTING=on"  # the user's own .deepspeed_env first, comments dropped
    assert {"BPT_DS_CACHE=/shared/cache dir", "TORCH_NCCL_ASYNC_ERROR_HANDLING=3", f"PYTHONPATH={ROOT}"} <= set(lines)
    assert not Path((tmp_path / "got.path").read_text().strip()).exists()  # the job's env file is cleaned up
    proc = subprocess.run(["bash", str(ROOT / "launch/multinode.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: " in proc.stderr and "HOSTFILE" in proc.stderr
