"""Crash safety of runs: checkpoint swaps that survive any crash point (twice in a row), ``kill -9`` and
``--resume`` with bit-identical results, a clean ``metrics.jsonl``, moved run folders, file modes, and
stopping on a non-finite loss.

The ``kill -9`` tests run the real CLI in a subprocess. Kills from this process land "somewhere after an
event" (the first checkpoint, the first finished epoch); kills at exact moments (between the two renames of
a checkpoint swap) come from the child itself, through a small wrapper that patches a hook and sends itself
SIGKILL, so they do not depend on timing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit.cli import main as cli_main
from vitkit.engine import train
from vitkit.engine.checkpoint import is_complete, remove_stale, resolve, write_checkpoint
from vitkit.errors import CheckpointError, TrainingError
from vitkit.utils import atomic_write_text

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and file modes")

# 22 steps per epoch, 66 in all; checkpoints/last at steps 5, 10, 15, 20, 22 (epoch end), 25, ...
RECIPE = [
    "data.name=digits", "model.name=vit_fmnist_tiny", "model.args.img_size=8", "model.args.patch_size=2",
    "model.args.embed_dim=16", "model.args.depth=2", "model.args.num_heads=2", "train.batch_size=64",
    "train.progress=false", "optim.lr=3e-3", "schedule.warmup_epochs=0.5", "train.epochs=3",
    "train.checkpoint_every_steps=5", "train.threads=1",
]
TIMING = ("train_img_s", "epoch_time_s", "fit_elapsed_s")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve(run / "checkpoints" / "last") / "model.safetensors"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _step(folder: Path) -> int:
    return torch.load(folder / "train_state.pt", weights_only=True)["step"]


def _same_run(run: Path, reference: Path) -> None:
    """Bit-identical final weights and the reference's metrics.jsonl except timing fields."""
    got, want = _weights(run), _weights(reference)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    rows = _records(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3], rows  # strictly increasing, no duplicate
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(rows) == strip(_records(reference))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 66 and Path(summary["output_dir"]) == run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train(None, [*RECIPE, f"output_dir={run}"])["finished"]
    return run


# ------------------------------------------------------------------------------------------------ file modes
def test_atomic_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        write_checkpoint(tmp_path / "ck", vitkit.create_model("vit_fmnist_tiny", depth=1), {"step": 1})
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    for f in (tmp_path / "ck").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


# ------------------------------------------------------------------------------------------------ crash points
class Crash(BaseException):
    """A simulated power cut: once raised, every later file-system call raises too, so no clean-up runs."""


class _Crasher:
    """Count os.rename / os.replace / os.fsync / shutil.rmtree calls; at call ``at`` the process "dies"
    (an rmtree dies after deleting one file: a half-deleted folder)."""

    def __init__(self, monkeypatch, at: int | None) -> None:
        self.at, self.calls, self.dead = at, 0, False
        real = {"rename": os.rename, "replace": os.replace, "fsync": os.fsync, "rmtree": shutil.rmtree}

        def wrap(name):
            def call(*args, **kw):
                if self.dead:
                    raise Crash(name)
                self.calls += 1
                if self.calls == self.at:
                    self.dead = True
                    if name == "rmtree" and Path(args[0]).is_dir():
                        files = sorted(p for p in Path(args[0]).iterdir() if p.is_file())
                        if files:
                            files[0].unlink()
                    raise Crash(name)
                if name == "fsync":
                    return None  # durability is not what is tested here; keeps the test fast
                return real[name](*args, **kw)
            return call

        for name in real:
            monkeypatch.setattr(os if name != "rmtree" else shutil, name, wrap(name))


class _Stub:
    """What write_checkpoint needs of a model: save_pretrained (atomic writes, like the real one)."""

    def save_pretrained(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from vitkit.utils import atomic_write, atomic_write_json

        atomic_write(folder / "model.safetensors", lambda p: save_file({"w": torch.ones(4)}, str(p)))
        atomic_write_json(folder / "config.json", {"name": "stub"})


def _write(folder: Path, step: int, monkeypatch, crash_at: int | None) -> int:
    """Write checkpoint ``step``; returns the number of file-system calls it made (crashing at ``crash_at``)."""
    with monkeypatch.context() as m:
        crasher = _Crasher(m, crash_at)
        try:
            write_checkpoint(folder, _Stub(), {"step": step}, extra_files={"train_config.yaml": "x: 1\n"})
        except Crash:
            assert crash_at is not None
        return crasher.calls


def _found(folder: Path) -> int:
    """The step of the checkpoint resolve() finds; it must be whole and loadable."""
    found = resolve(folder)
    assert is_complete(found) and (found / "config.json").is_file() and (found / "train_config.yaml").is_file()
    load_file(str(found / "model.safetensors"))
    return _step(found)


def _state(checkpoints: Path) -> frozenset:
    """What a crash left, up to the random parts of temporary names: (kind, complete, step) per folder."""
    def describe(p: Path):
        if ".del-" in p.name:  # being deleted: never read
            return "del"
        complete = is_complete(p, require_marker=True)
        if ".tmp-" in p.name:
            return ("tmp", _step(p)) if complete else "half-written tmp"
        return p.name, sorted(f.name for f in p.iterdir()), _step(p) if complete else None

    return frozenset(repr(describe(p)) for p in checkpoints.iterdir())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "checkpoints" / "last"


@pytest.mark.parametrize("clean_between", [True, False], ids=["restart", "same-process"])
def test_every_crash_point_twice_in_a_row_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, clean_between):
    """Crash checkpoint 2 at every file-system call, then (after a restart, or not) crash checkpoint 3 at every
    call: resolve() always finds a complete checkpoint, never an older one than before the second crash, and
    the next write recovers. clean_between: remove_stale runs between the crashes, as at a trainer start."""
    base = tmp_path / "base" / "checkpoints" / "last"
    _write(base, 1, monkeypatch, None)
    n_first = _write(_copy(tmp_path / "base", tmp_path / "count"), 2, monkeypatch, None)
    assert n_first >= 8
    seen_first, seen_second, states = set(), set(), set()
    for i in range(1, n_first + 1):
        first = _copy(tmp_path / "base", tmp_path / f"c{i}")
        _write(first, 2, monkeypatch, i)
        after_first = _found(first)
        assert after_first in (1, 2), i
        seen_first.add(after_first)
        if _state(first.parent) in states:  # e.g. crashes at any point before the marker: a half-written tmp
            shutil.rmtree(first.parents[1])
            continue
        states.add(_state(first.parent))
        if clean_between:
            remove_stale(first.parent)
            assert _found(first) == after_first
            assert not list(first.parent.glob(".last.del-*"))
        n_second = _write(_copy(first.parents[1], tmp_path / f"probe{i}"), 3, monkeypatch, None)
        for j in range(1, n_second + 1):
            second = _copy(first.parents[1], tmp_path / f"c{i}-{j}")
            _write(second, 3, monkeypatch, j)
            after_second = _found(second)
            assert after_second in (after_first, 3), (i, j, after_first, after_second)
            seen_second.add(after_second)
            remove_stale(second.parent)
            assert _found(second) == after_second, (i, j)
            leftovers = [p.name for p in second.parent.iterdir() if p.name.startswith(".")]
            assert len(leftovers) <= 1 and (not leftovers or resolve(second) == second.parent / leftovers[0])
            _write(second, 4, monkeypatch, None)  # and the next write works
            assert _found(second) == 4 and not [p for p in second.parent.iterdir() if p.name != "last"]
            shutil.rmtree(second.parents[1])
        shutil.rmtree(tmp_path / f"probe{i}")
    assert seen_first == {1, 2} and seen_second >= {1, 3}  # both outcomes occur: the crash points are real
    assert len(states) >= 5


def test_resolve_order_markers_and_remove_stale_keep_the_only_copy(tmp_path):
    model = vitkit.create_model("vit_fmnist_tiny", depth=1)
    ckpts = tmp_path / "checkpoints"
    write_checkpoint(ckpts / "last", model, {"step": 1})
    # Only a complete temporary copy (e.g. left by an older vitkit's double crash) and debris around it.
    (ckpts / "last").rename(ckpts / ".last.tmp-1-aaaa")
    shutil.copytree(ckpts / ".last.tmp-1-aaaa", ckpts / ".last.tmp-2-bbbb")
    (ckpts / ".last.tmp-2-bbbb" / "train_state.pt").write_bytes(b"truncated")  # sizes disagree with the marker
    shutil.copytree(ckpts / ".last.tmp-1-aaaa", ckpts / ".last.tmp-3-cccc")
    (ckpts / ".last.tmp-3-cccc" / ".complete").unlink()  # never finished
    (ckpts / ".last.del-4-dddd").mkdir()
    assert resolve(ckpts / "last") == ckpts / ".last.tmp-1-aaaa"
    remove_stale(ckpts)
    assert sorted(p.name for p in ckpts.iterdir()) == [".last.tmp-1-aaaa"]  # the only complete copy stays
    assert _step(resolve(ckpts / "last")) == 1
    write_checkpoint(ckpts / "last", model, {"step": 2})
    remove_stale(ckpts)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last"] and _step(resolve(ckpts / "last")) == 2
    # A checkpoint written before markers existed still counts where it was swapped in whole.
    (ckpts / "last" / ".complete").unlink()
    assert resolve(ckpts / "last") == ckpts / "last"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve(tmp_path / "nothing" / "last")


# ------------------------------------------------------------------------------------------------ in-process runs
def test_resume_from_a_lone_temporary_checkpoint_and_into_a_moved_folder(tmp_path, reference, capsys):
    run = tmp_path / "run"
    train(None, [*RECIPE, "train.max_steps=10", f"output_dir={run}"])
    ckpts = run / "checkpoints"
    (ckpts / "last").rename(ckpts / ".last.tmp-99-abcd")  # final and .old gone: the complete copy is a tmp
    (ckpts / ".last.tmp-98-half").mkdir()  # a half-written one, no marker
    moved = tmp_path / "renamed"
    run.rename(moved)
    capsys.readouterr()
    train(None, [], resume=moved / "checkpoints" / "last")  # a checkpoint folder inside the run folder
    out = capsys.readouterr()
    log = out.out + out.err
    assert f"writing to {moved}" in log and ".last.tmp-99-abcd at epoch 0, step 10" in log
    assert not run.exists()
    _same_run(moved, reference)
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["best", "last"]
    assert f"output_dir: {moved}" in (moved / "config.yaml").read_text()


def _poison_step(monkeypatch, at: int, rank: int | None = None) -> None:
    """Make the classification loss NaN at the ``at``-th training step (after computing it normally)."""
    from vitkit.tasks.classify import ClassificationTask

    real, calls = ClassificationTask.training_step, {"n": 0}

    def training_step(self, model, batch):
        loss, stats = real(self, model, batch)
        calls["n"] += 1
        if calls["n"] == at:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(ClassificationTask, "training_step", training_step)


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, reference):
    run = tmp_path / "run"
    _poison_step(monkeypatch, at=29)  # epoch 2, step 7; checkpoints/last is step 25
    with pytest.raises(TrainingError) as err:
        train(None, [*RECIPE, f"output_dir={run}"])
    msg = str(err.value)
    assert "\n" not in msg and "non-finite (nan) at step 29 (epoch 2/3, step 7 of 22)" in msg
    assert "(step 25) is kept" in msg and "optim.lr" in msg and "optim.clip_grad" in msg
    assert _step(resolve(run / "checkpoints" / "last")) == 25
    assert not (run / "summary.json").exists()
    assert [r["epoch"] for r in _records(run)] == [1]
    monkeypatch.undo()
    train(None, [], resume=run)
    _same_run(run, reference)


def test_processes_agree_on_a_non_finite_loss(tmp_path, monkeypatch):
    """Under DDP the flag is summed over processes: one whose own loss is finite stops too (a real 2-process
    run stops every rank at the same step; here the other process is simulated)."""
    import vitkit.engine.trainer as trainer_module
    from vitkit.engine import Trainer, load_config
    from vitkit.engine.distributed import DistInfo

    trainer = Trainer(load_config(None, [*RECIPE, f"output_dir={tmp_path / 'run'}"]))
    trainer.dist = DistInfo(world_size=2)
    other = {"bad": 0.0}
    monkeypatch.setattr(trainer_module, "all_reduce_sum", lambda t, info: t + other["bad"])
    trainer._check_finite(None)  # nobody saw a bad loss
    other["bad"] = 1.0
    with pytest.raises(TrainingError, match=r"non-finite \(on another process\) at step 1 "):
        trainer._check_finite(None)
    with pytest.raises(TrainingError, match=r"non-finite \(inf\) at step 1 .*no checkpoint was written"):
        trainer._check_finite(float("inf"))


def test_cli_exits_2_on_a_diverging_run(tmp_path, capsys):
    run = tmp_path / "run"
    args = _sets([*RECIPE, "optim.lr=1e12", "train.checkpoint_every_steps=1"])
    assert cli_main(["train", *args, "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vitkit train: error: the training loss became non-finite" in err[0], err
    last = resolve(run / "checkpoints" / "last")
    assert all(torch.isfinite(v).all() for v in load_file(str(last / "model.safetensors")).values())
    assert _step(last) >= 1 and not (run / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ kill -9
WRAPPER = textwrap.dedent('''
    """Run the vitkit CLI and SIGKILL this process at an exact moment: KILL_AT="<before|after>:<name>:<step>" kills
    before/after the checkpoint swap's rename to <name> during the save of checkpoints/last at <step>."""
    import os, pathlib, signal, sys
    from vitkit.engine.trainer import Trainer
    from vitkit.cli import main

    when, name, step = os.environ["KILL_AT"].split(":")
    armed = {"on": False}
    real_save, real_rename = Trainer.save, pathlib.Path.rename

    def save(self, which="last", *args, **kw):
        armed["on"] = which == "last" and self.step == int(step)
        return real_save(self, which, *args, **kw)

    def rename(self, target):
        hit = armed["on"] and pathlib.Path(target).name == name
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real_rename(self, target)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    Trainer.save, pathlib.Path.rename = save, rename
    sys.exit(main(sys.argv[1:]))
''')


def _spawn(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**ENV, **env})


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"timed out: {log.read_text()[-2000:]}") from None


def _kill_when(proc: subprocess.Popen, log: Path, ready, timeout: float = 240) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; the run must not have ended by itself before."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the kill:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the kill point"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert _wait(proc, log) == -signal.SIGKILL, f"the run was not killed:\n{log.read_text()[-2000:]}"


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_kill_9_after_a_checkpoint_and_mid_epoch_then_resume(tmp_path, reference):
    """Killed from outside: right after the first checkpoint appears, then (resumed) somewhere after the first
    epoch's record; resumed again it ends bit-identical to the uninterrupted run."""
    run, cli = tmp_path / "run", [sys.executable, "-m", "vitkit.cli", "train"]
    proc = _spawn([*cli, *_sets(RECIPE), "--output-dir", str(run)], tmp_path / "1.log")
    _kill_when(proc, tmp_path / "1.log", lambda: (run / "checkpoints" / "last" / "train_state.pt").is_file())
    assert _step(resolve(run / "checkpoints" / "last")) < 66

    done = _lines(run / "metrics.jsonl")  # 0: the first kill came long before the end of epoch 1
    proc = _spawn([*cli, "--resume", str(run)], tmp_path / "2.log")
    _kill_when(proc, tmp_path / "2.log", lambda: _lines(run / "metrics.jsonl") > done)
    assert not (run / "summary.json").exists()

    # The last session runs in this process (the CLI's own entry point): it is not killed, and this saves
    # a Python start-up.
    assert cli_main(["train", "--resume", str(run / "checkpoints" / "last")]) == 0
    _same_run(run, reference)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]


def test_kill_9_between_renames_twice_then_resume_in_a_moved_folder(tmp_path, reference, capsys):
    """Killed at the worst moments: between the renames of the epoch-end save (metrics.jsonl already holds
    epoch 1, the checkpoint that resume finds is step 20), then again in the resumed run just before the new
    checkpoint is renamed in (the final name is missing the whole time); the folder is then moved and the
    resumed run writes into the new folder only."""
    run = tmp_path / "run"
    wrapper = tmp_path / "kill_wrapper.py"
    wrapper.write_text(WRAPPER)
    ckpts = run / "checkpoints"

    proc = _spawn([sys.executable, str(wrapper), "train", *_sets(RECIPE), "--output-dir", str(run)],
                  tmp_path / "1.log", KILL_AT="after:.last.old:22")
    assert _wait(proc, tmp_path / "1.log") == -signal.SIGKILL, (tmp_path / "1.log").read_text()[-3000:]
    assert not (ckpts / "last").exists() and _step(ckpts / ".last.old") == 20
    assert [r["epoch"] for r in _records(run)] == [1]  # written before the epoch-end checkpoint
    assert resolve(ckpts / "last") == ckpts / ".last.old"

    proc = _spawn([sys.executable, str(wrapper), "train", "--resume", str(run)], tmp_path / "2.log",
                  KILL_AT="before:last:22")
    assert _wait(proc, tmp_path / "2.log") == -signal.SIGKILL, (tmp_path / "2.log").read_text()[-3000:]
    assert "left by an interrupted checkpoint write" in (tmp_path / "2.log").read_text()
    assert not (ckpts / "last").exists() and _step(resolve(ckpts / "last")) == 20
    assert [r["epoch"] for r in _records(run)] == [1]  # cut back to the checkpoint, then epoch 1 once more

    moved = tmp_path / "moved"
    run.rename(moved)
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(moved)]) == 0
    assert f"writing to {moved}" in capsys.readouterr().out
    assert not run.exists()
    _same_run(moved, reference)
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["best", "last"]
