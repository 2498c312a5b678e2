"""The README works as written: every block marked ``<!-- walk: NAME -->`` runs, command by command and in order, in
a fresh folder, with only its sizes made tiny.

What the walk changes, and nothing else:

* Fashion-MNIST is a small fake copy (random pixels, real file format) found through ``$VITKIT_DATA``, as in
  ``tests/test_data.py``: the commands find it where ``make data`` puts the real one;
* ``vitkit train``: one epoch (a ``--resume`` line that sets ``train.epochs`` gets one more), batches of 16, the
  scene and caption datasets a few dozen items, and a generator's sample picture one row per class instead of 8;
  ``vitkit sparsevit search``: a few candidates on a few images;
* ``make TARGET`` runs the target's vitkit commands from the Makefile (``make demo`` trains with its recipe and
  ``DEMO_DIR``); ``source`` lines are skipped; ``python scripts/...`` runs the script in this process;
* ``vitkit serve`` builds its app without binding a port (``uvicorn.run`` is replaced) and the ``curl`` lines
  that follow it are sent to that app.

Every vitkit command goes through ``vitkit.cli.main`` and must exit 0, so an unknown flag, a missing run folder
or a failing tool fails the walk with the README line that broke.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
import yaml

from test_data import write_fake_fmnist
from test_readme import README, ROOT, bash_blocks, commands, make_recipe
from vitkit.cli import main as cli_main
from vitkit.data import fashion_mnist as fm

pytestmark = pytest.mark.slow

WALKS = {name: body for name, body in bash_blocks(README.read_text(encoding="utf-8")) if name}
TRAIN_SIZE, TEST_SIZE = 160, 32  # fake Fashion-MNIST (finetune_tiny trains on 10%: 16 images)
TINY_TRAIN = ["train.epochs=1", "train.batch_size=16", "train.eval_batch_size=64", "train.progress=false"]
TINY_DATA = {  # dataset name -> its size settings
    "fmnist_scenes": ["data.args.num_scenes=32", "data.args.num_eval_scenes=16"],
    "fmnist_captions": ["data.args.num=48"],
}
TINY_SEARCH = ["--eval-images", "8", "--population", "4", "--generations", "1", "--choices", "0.5", "1.0",
               "--latency-batch", "2"]


def test_the_readme_marks_its_walks():
    assert "first-hour" in WALKS, "README: the first-hour block lost its <!-- walk: first-hour --> marker"
    assert {"ssl", "vision-language", "generation", "sparsevit"} <= set(WALKS)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh folder holding the repository's recipes, with a fake Fashion-MNIST where ``make data`` puts it."""
    write_fake_fmnist(tmp_path / "data" / "fashion-mnist", n_train=TRAIN_SIZE, n_test=TEST_SIZE)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path / "data"))
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two fighting
    yield tmp_path
    torch.set_num_threads(threads)


def _tiny_train(args: list[str]) -> list[str]:
    """``vitkit train`` arguments on tiny settings: epochs, batch sizes and dataset sizes only."""
    overrides = []
    resume = "--resume" in args
    out, skip = [], False
    for i, token in enumerate(args):  # drop the README's own epoch setting
        if skip:
            skip = False
            continue
        if token == "--set" and args[i + 1].startswith("train.epochs="):
            skip = True
            if resume:  # one more epoch than the tiny first session
                overrides.append("train.epochs=2")
            continue
        out.append(token)
    if not resume:
        overrides += TINY_TRAIN
        config = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "--recipe")), None)
        recipe = (yaml.safe_load(Path(config).read_text()) or {}) if config else {}
        data, task = recipe.get("data") or {}, recipe.get("task") or {}
        overrides += TINY_DATA.get(data.get("name") if isinstance(data, dict) else None, [])
        if isinstance(task, dict) and "samples_per_class" in (task.get("args") or {}):
            overrides.append("task.args.samples_per_class=1")  # the picture drawn after each evaluation
    return out + [x for o in overrides for x in ("--set", o)]


def _tiny(args: list[str]) -> list[str]:
    if args[:1] == ["train"]:
        return _tiny_train(args)
    if args[:2] == ["sparsevit", "search"]:
        return args + TINY_SEARCH
    return args


class Walk:
    """Runs a README block's commands one by one in the current folder."""

    def __init__(self, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.name, self.monkeypatch, self.app, self.timings = name, monkeypatch, None, []

    def fail(self, line: str, why: str) -> None:
        pytest.fail(f"README walk {self.name!r}: `{line}` {why}", pytrace=False)

    def run(self, argv: list[str], line: str) -> None:
        start = time.perf_counter()
        if argv[0] == "make" and len(argv) == 2:
            recipe = make_recipe(argv[1])
            if not recipe:
                self.fail(line, "runs no vitkit command the walk can follow")
            for sub in recipe:
                self.vitkit(sub[1:], line)
        elif argv[0] == "source":
            pass  # the test's interpreter is the venv's
        elif argv[0] == "vitkit":
            self.vitkit(argv[1:], line)
        elif argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
            self.script(argv[1], argv[2:], line)
        elif argv[0] == "curl":
            self.curl(argv[1:], line)
        else:
            self.fail(line, "is a command the walk does not know how to run: teach tests/test_first_hour.py")
        self.timings.append((time.perf_counter() - start, line))

    def vitkit(self, args: list[str], line: str) -> None:
        args = _tiny(args)
        if args[:1] == ["serve"]:
            import uvicorn

            def capture(app, **_kw):
                self.app = app

            self.monkeypatch.setattr(uvicorn, "run", capture)
        try:
            code = cli_main(args)
        except SystemExit as e:  # argparse: unknown flag, missing argument
            code = e.code
        if code not in (0, None):
            self.fail(line, f"exited {code} (ran as `vitkit {shlex.join(args)}`)")

    def script(self, path: str, args: list[str], line: str) -> None:
        target = Path(path) if Path(path).is_file() else ROOT / path
        if not target.is_file():
            self.fail(line, f"runs {path}, which does not exist")
        saved = sys.argv
        sys.argv = [str(target), *args]
        try:
            runpy.run_path(str(target), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            sys.argv = saved
        if code not in (0, None):
            self.fail(line, f"exited {code}")

    def curl(self, args: list[str], line: str) -> None:
        from fastapi.testclient import TestClient

        if self.app is None:
            self.fail(line, "comes before any `vitkit serve` line")
        files, url = {}, None
        with contextlib.ExitStack() as stack:
            for flag, value in zip(args, args[1:] + [""]):
                if flag == "-F":
                    key, _, spec = value.partition("=@")
                    if not Path(spec).is_file():
                        self.fail(line, f"uploads {spec}, which does not exist")
                    files[key] = (Path(spec).name, stack.enter_context(open(spec, "rb")))
            url = next(a for a in args if a.startswith("http"))
            parts = urlsplit(url)
            client = TestClient(self.app)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            response = client.post(target, files=files) if files else client.get(target)
        if response.status_code != 200:
            self.fail(line, f"got HTTP {response.status_code}: {response.text[:300]}")


@pytest.mark.parametrize("name", list(WALKS))
def test_readme_block_runs_as_written(name, workspace, monkeypatch, capsys):
    walk = Walk(name, monkeypatch)
    lines = [shlex.join(argv) for argv in commands(WALKS[name])]
    for argv, line in zip(commands(WALKS[name]), lines):
        walk.run(argv, line)
    with capsys.disabled():
        if os.environ.get("VITKIT_WALK_TIMES"):  # VITKIT_WALK_TIMES=1 pytest -s: what each line costs
            for seconds, line in walk.timings:
                print(f"{seconds:6.1f} s  {line}")
