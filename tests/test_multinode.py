"""Multi-node ``torchrun`` on one machine: 2 nodes x 1 process through the c10d rendezvous, and an elastic restart.

Every run trains the same tiny ViT on the built-in digits (2 epochs of 11 steps, a checkpoint every 4 steps, random
flips so each process's RNG stream matters) with 2 processes in all. The reference is a single-node 2-process run
(``--standalone``). Two nodes are two ``torchrun`` agents that meet at ``--rdzv-endpoint`` (an agent's TCP store).

Bit-identical is expected and asserted: the world size, the ranks' data shards and the DDP buckets are the same,
and an all-reduce over two processes adds two numbers, which floating point does in either order alike (three or
more processes could sum in another order, which only a tolerance would cover).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitkit.engine import train
from vitkit.engine.checkpoint import resolve
from vitkit.errors import ConfigError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals; gloo over TCP")

# 1437 * 0.25 = 359 train images, global batch 32: 11 steps per epoch, 22 in all; checkpoints/last at steps
# 4, 8, 11 (epoch end), 12, 16, 20 and 22.
RECIPE = [
    "data.name=digits", "data.train_fraction=0.25", "model.name=vit_fmnist_tiny", "model.args.img_size=8",
    "model.args.patch_size=2", "model.args.embed_dim=16", "model.args.depth=2", "model.args.num_heads=2",
    "train.batch_size=32", "train.epochs=2", "train.checkpoint_every_steps=4", "train.threads=1",
    "train.progress=false", "optim.lr=3e-3", "schedule.warmup_epochs=0.5", "augment.hflip=true",
    "augment.label_smoothing=0.1",
]
STEPS = 22
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 120

# Runs the vitkit CLI; SIGKILLs the process of global rank KILL_RANK during the save of checkpoints/last at step
# KILL_STEP, right after ``last`` was renamed to ``.last.old`` (no folder named ``last`` exists then: the worst moment
# for a restart to find the run). Once: the file KILL_MARKER records the kill. (TORCHELASTIC_RESTART_COUNT cannot
# tell: each agent counts its own restarts, and one that restarts for the other node's failure counts none.)
KILL_WRAPPER = textwrap.dedent('''
    import os, pathlib, signal, sys
    from vitkit.engine.trainer import Trainer
    from vitkit.cli import main

    rank, step, marker = int(os.environ["KILL_RANK"]), int(os.environ["KILL_STEP"]), os.environ["KILL_MARKER"]
    armed = {"on": False}
    real_save, real_rename = Trainer.save, pathlib.Path.rename

    def save(self, which="last", *args, **kw):
        armed["on"] = which == "last" and self.step == step and self.dist.rank == rank and not os.path.exists(marker)
        return real_save(self, which, *args, **kw)

    def rename(self, target):
        out = real_rename(self, target)
        if armed["on"] and pathlib.Path(target).name == ".last.old":
            pathlib.Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    Trainer.save, pathlib.Path.rename = save, rename
    sys.exit(main(sys.argv[1:]))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _torchrun(launch: list[str], program: list[str], log: Path, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, *program]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**ENV, **env})


def _nodes(run: Path, logs: Path, program: list[str], max_restarts: int = 0, **env: str) -> list[Path]:
    """Start two one-process "nodes" that meet at a c10d rendezvous on a free port; wait for both; their logs."""
    port, rdzv_id = _free_port(), uuid.uuid4().hex[:8]
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id, "--local-addr", "127.0.0.1",
              "--max-restarts", str(max_restarts), "--monitor-interval", "0.5"]
    args = [*program, "train", *_sets(RECIPE), "--output-dir", str(run), "--if-exists", "resume"]
    paths = [logs / f"node{i}.log" for i in range(2)]
    procs = [_torchrun(launch, args, path, **env) for path in paths]
    deadline = time.monotonic() + TIMEOUT
    try:
        for proc, path in zip(procs, paths):
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert rc == 0, f"{path.name} exited {rc}:\n{path.read_text()[-4000:]}"
    except subprocess.TimeoutExpired:
        raise AssertionError("timed out:\n" + "\n".join(p.read_text()[-2000:] for p in paths)) from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return paths


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve(run / "checkpoints" / "last") / "model.safetensors"))


def _records(run: Path) -> list[dict]:
    timing = ("train_img_s", "epoch_time_s", "fit_elapsed_s")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def _summary(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    for key in ("train_wall_clock_s", "train_img_s", "output_dir", "best_checkpoint", "last_checkpoint"):
        s.pop(key)
    return s


def _same_run(run: Path, reference: Path) -> None:
    """Bit-identical final weights, metrics.jsonl (but timing) and summary.json (but timing and paths)."""
    got, want = _weights(run), _weights(reference)
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}: max abs diff " \
                       f"{(got[differ[0]] - want[differ[0]]).abs().max().item():.3g}"
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    assert _records(run) == _records(reference)
    assert _summary(run) == _summary(reference)
    assert _summary(run)["finished"] and _summary(run)["steps"] == STEPS


@pytest.fixture(scope="module")
def single_node(tmp_path_factory) -> Path:
    """The uninterrupted reference: one node, two processes."""
    tmp = tmp_path_factory.mktemp("single")
    log = tmp / "torchrun.log"
    proc = _torchrun(["--standalone", "--nproc-per-node", "2"],
                     ["-m", "vitkit.cli", "train", *_sets(RECIPE), "--output-dir", str(tmp / "run")], log)
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}") from None
    assert rc == 0, log.read_text()[-4000:]
    return tmp / "run"


@pytest.mark.slow  # three torchrun agents and four workers in all (with the fixture): about 30 s on two cores
def test_two_nodes_c10d_match_one_node_with_two_processes(tmp_path, single_node):
    run = tmp_path / "run"
    logs = _nodes(run, tmp_path, ["-m", "vitkit.cli"])
    text = "".join(p.read_text() for p in logs)
    assert "batch 32 on 2 process(es)" in text  # rank 0, on whichever node the rendezvous made node 0
    assert "resumed from" not in text  # --if-exists resume on a fresh folder starts afresh
    _same_run(run, single_node)


@pytest.mark.slow  # two agents, four workers: about 40 s on two cores
def test_elastic_restart_after_a_sigkill_resumes_and_ends_bit_identical(tmp_path, single_node):
    """Rank 0 is killed between the two renames of its step-16 checkpoint; both agents restart their workers once
    (``--max-restarts 1``) and the same command, thanks to ``--if-exists resume``, continues from the complete
    checkpoint that is left (``.last.old``, step 12) and ends bit-identical to the uninterrupted run."""
    run = tmp_path / "run"
    wrapper = tmp_path / "kill_wrapper.py"
    wrapper.write_text(KILL_WRAPPER)
    marker = tmp_path / "killed"
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each round's rank 0 hosts a fresh store; the agent's shared store keeps
    # the previous round's addresses, which restarted workers may read (pytorch/pytorch#135712)
    logs = _nodes(run, tmp_path, [str(wrapper)], max_restarts=1, KILL_RANK="0", KILL_STEP="16",
                  KILL_MARKER=str(marker), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    text = "".join(p.read_text() for p in logs)
    assert marker.is_file() and f"(pid: {marker.read_text()})" in text, text[-4000:]  # torchrun saw the kill
    assert "resumed from" in text and "at epoch 1, step 12" in text, text[-4000:]
    assert "left by an interrupted checkpoint write" in text  # the step-16 copy, superseded
    _same_run(run, single_node)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]


# ------------------------------------------------------------------------------------------------ in-process
def test_if_exists_resume_finds_a_checkpoint_caught_between_its_renames(tmp_path, capsys):
    """What a restarted command sees when the kill came between the renames of a swap: no folder named ``last``,
    the complete copy ``.last.old``. ``--if-exists resume`` continues from it (it used to start the run afresh)."""
    run = tmp_path / "run"
    train(None, [*RECIPE, "train.max_steps=4", f"output_dir={run}"])
    (run / "checkpoints" / "last").rename(run / "checkpoints" / ".last.old")
    capsys.readouterr()
    summary = train(None, [*RECIPE, "train.max_steps=8", f"output_dir={run}"], if_exists="resume")
    assert ".last.old at epoch 0, step 4" in capsys.readouterr().out and summary["steps"] == 8


def test_a_restart_without_if_exists_resume_says_how_to_continue(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError) as plain:
        train(None, [*RECIPE, f"output_dir={run}"])
    assert "torchrun" not in str(plain.value)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun sets in a restarted worker
    with pytest.raises(ConfigError, match=r"already holds a run; .*\(this is torchrun's restart 1: launch with "
                                          r"--if-exists resume so that a restarted job continues its run\)$"):
        train(None, [*RECIPE, f"output_dir={run}"])


def test_restarts_with_the_shared_rendezvous_store_warn(monkeypatch):
    """torchrun --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0 names the variable (the process
    group itself is not joined here)."""
    import torch.distributed as dist

    from vitkit.engine.distributed import init_distributed

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "TORCHELASTIC_MAX_RESTARTS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.warns(UserWarning, match="export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun"):
        info = init_distributed("cpu")
    assert info.world_size == 2 and info.device == torch.device("cpu")
    for key, value in (("TORCHELASTIC_USE_AGENT_STORE", "False"), ("TORCHELASTIC_MAX_RESTARTS", "0")):
        monkeypatch.setenv(key, value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            init_distributed("cpu")
        monkeypatch.setenv(key, env[key])
