"""Experiment trackers (``train.loggers``): TensorBoard and MLflow get what metrics.jsonl gets, at the same steps,
plus the config and the pictures; resume continues the same MLflow run and TensorBoard folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vitkit.engine import config_to_dict, load_config, train
from vitkit.engine.loggers import MLFLOW_RUN_FILE, Loggers, flatten, open_loggers
from vitkit.errors import ConfigError, MissingExtraError

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# A tiny ViT on half of the built-in 8x8 digits (8 steps an epoch with a validation split): a second or two.
TINY = [
    "data.name=digits", "data.train_fraction=0.5", "model.name=vit_fmnist_tiny", "model.args.img_size=8",
    "model.args.patch_size=2", "model.args.embed_dim=16", "model.args.depth=2", "model.args.num_heads=2",
    "train.batch_size=64", "train.progress=false", "optim.lr=3e-3", "schedule.warmup_epochs=0.5",
]
BOTH = "train.loggers=[tensorboard,mlflow]"


@pytest.fixture(autouse=True)
def _own_environment(monkeypatch):
    """No tracking server of the machine; the tests read local file stores (the trainings in ``resumed_run`` and
    under DDP run without this opt-in: the logger gives it itself)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _board(run: Path) -> EventAccumulator:
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    board.Reload()
    return board


def _mlflow(run: Path) -> tuple[MlflowClient, str]:
    saved = json.loads((run / MLFLOW_RUN_FILE).read_text())
    return MlflowClient(saved["tracking_uri"]), saved["run_id"]


def _expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of metrics.jsonl as (step, value) pairs, in order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in _records(run):
        for key, value in record.items():
            if key != "step":
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> tuple[Path, str, dict]:
    """A run with both loggers, stopped after epoch 1 of 2 and resumed, with a stale TensorBoard point in between
    (what a crashed session logs after its checkpoint). Returns the run folder, the first session's MLflow run id
    and the final summary."""
    tmp = tmp_path_factory.mktemp("loggers")
    recipe = tmp / "tiny_recipe.yaml"  # names the MLflow experiment
    OmegaConf.save(OmegaConf.from_dotlist(TINY), recipe)
    run = tmp / "run"
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        stopped = train(recipe, ["train.epochs=2", "train.max_steps=8", "data.val_fraction=0.2", BOTH,
                                 f"output_dir={run}"])
        assert not stopped["finished"] and stopped["steps"] == 8
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run / "tensorboard")) as stale:
            stale.add_scalar("train_loss", 123.0, 12)
        first_id = _mlflow(run)[1]
        summary = train(None, [], resume=run)
    return run, first_id, summary


def test_every_metric_the_config_and_the_pictures_reach_both_loggers(resumed_run):
    run, _, summary = resumed_run
    expected = _expected(run)
    assert {"train_loss", "lr", "train_img_s", "eval_top1", "eval_loss"} <= set(expected)
    assert [s for s, _ in expected["eval_top1"]] == [8, 16]
    test = {f"test_{k}": [(summary["steps"], float(v))] for k, v in summary["test"].items()}
    assert "test_top1" in test

    board = _board(run)
    for key, points in {**expected, **test}.items():
        got = [(e.step, e.value) for e in board.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), key  # float32 in events
    assert {"curves", "confusion"} <= set(board.Tags()["images"])
    assert any(tag.startswith("config") for tag in board.Tags()["tensors"])

    client, run_id = _mlflow(run)
    for key, points in {**expected, **test}.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == points, key
    mlrun = client.get_run(run_id)
    assert mlrun.info.run_name == "run"
    assert client.get_experiment(mlrun.info.experiment_id).name == "tiny_recipe"
    config = flatten(config_to_dict(load_config(run / "config.yaml")))
    params = mlrun.data.params
    assert params["optim.lr"] == "0.003" and params["data.val_fraction"] == "0.2"
    assert params["train.loggers"] == '["tensorboard", "mlflow"]' and set(params) == set(config)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"curves.png", "confusion.png", "config.yaml"} <= artifacts


def test_resume_continues_the_same_run_without_duplicate_steps(resumed_run):
    run, first_id, _ = resumed_run
    client, run_id = _mlflow(run)
    assert run_id == first_id  # the same MLflow run, continued
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"
    expected = _expected(run)
    assert [s for s, _ in expected["epoch"]] == [8, 16]
    board = _board(run)
    for key, points in expected.items():  # each step once; the stale point at step 12 is purged
        assert [m.step for m in client.get_metric_history(run_id, key)] == [s for s, _ in points], key
        assert [e.step for e in board.Scalars(key)] == [s for s, _ in points], key
    assert 123.0 not in [e.value for e in board.Scalars("train_loss")]


def test_without_loggers_nothing_is_tracked(tmp_path):
    train(None, [*TINY, "train.max_steps=1", f"output_dir={tmp_path / 'run'}"])
    assert not {"tensorboard", "mlruns", MLFLOW_RUN_FILE} & {p.name for p in (tmp_path / "run").iterdir()}


@pytest.mark.parametrize("override,match", [
    ("train.loggers=[tensorboard,wandb]", r"^invalid setting: train\.loggers=.*wandb.*tensorboard, mlflow$"),
    ("train.loggers=[mlflow,mlflow]", r"train\.loggers=.*distinct"),
    ("train.logger_args.mlflow.experimnt=x", r"train\.logger_args\.mlflow\.experimnt"),
])
def test_bad_logger_settings_are_one_line_errors(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("module,name", [("mlflow", "mlflow"), ("torch.utils.tensorboard", "tensorboard")])
def test_a_missing_package_names_the_extra(tmp_path, monkeypatch, module, name):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    with pytest.raises(MissingExtraError, match=r"vitkit\[track\]") as info:
        train(None, [*TINY, "train.max_steps=1", f"train.loggers=[{name}]", f"output_dir={tmp_path / 'run'}"])
    assert "\n" not in str(info.value) and module in str(info.value)


def test_long_params_are_cut_and_the_tracking_uri_is_honoured(tmp_path, monkeypatch):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    uri = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")  # newer clients cut too: the cut must be ours
    cfg = load_config(None, ["train.loggers=[mlflow]", "train.logger_args.mlflow.run_name=named"])
    config = {"a": {"long": "x" * (MAX_PARAM_VAL_LENGTH + 50), "empty": {}}, "n": None, "pair": [1, 2]}
    (tmp_path / "run").mkdir()
    loggers = open_loggers(["mlflow"], cfg.train.logger_args, tmp_path / "run", config=config, config_yaml="a: 1\n",
                           primary="eval_top1")
    loggers.log_metrics({"step": 3, "loss": 0.5, "note": "text"}, 3)
    loggers.close()
    client, run_id = _mlflow(tmp_path / "run")
    assert client.tracking_uri == uri and not (tmp_path / "run" / "mlruns").exists()
    run = client.get_run(run_id)
    assert run.info.run_name == "named" and client.get_experiment(run.info.experiment_id).name == "vitkit"
    assert run.data.params == {"a.long": "x" * MAX_PARAM_VAL_LENGTH, "a.empty": "{}", "n": "null", "pair": "[1, 2]"}
    assert run.data.metrics == {"loss": 0.5}


def test_a_failing_logger_warns_once_and_the_others_go_on():
    class Broken:
        name = "broken"

        def log_metrics(self, metrics, step):
            raise OSError("disk full\nsecond line")

    class Kept:
        name = "kept"
        seen: list = []

        def log_metrics(self, metrics, step):
            self.seen.append((step, dict(metrics)))

        def close(self, status):
            self.seen.append(status)

    kept = Kept()
    loggers = Loggers([Broken(), kept])
    with pytest.warns(UserWarning, match=r"^train\.loggers: broken failed \(OSError: disk full\); the run goes on"):
        loggers.log_metrics({"step": 1, "loss": 1.0}, 1)
    loggers.log_metrics({"loss": 2.0}, 2)
    loggers.close("FAILED")
    assert kept.seen == [(1, {"loss": 1.0}), (2, {"loss": 2.0}), "FAILED"]


def test_a_run_that_raises_closes_its_loggers_as_failed(tmp_path, monkeypatch):
    from vitkit.engine.trainer import Trainer

    def crash(self):
        self.loggers.log_metrics({"loss": 1.0}, 1)
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "_run_epoch", crash)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        train(None, [*TINY, BOTH, f"output_dir={run}"])
    client, run_id = _mlflow(run)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [e.value for e in _board(run).Scalars("loss")] == [1.0]  # flushed and closed


def test_an_unusable_tracking_uri_is_one_line(tmp_path):
    cfg = load_config(None, ["train.logger_args.mlflow.tracking_uri=bogus://x"])
    with pytest.raises(ConfigError, match=r"^train\.loggers: mlflow at bogus://x .*tracking_uri\): \S") as info:
        open_loggers(["mlflow"], cfg.train.logger_args, tmp_path, config={}, config_yaml="", primary="eval_top1")
    assert "\n" not in str(info.value)


def test_under_ddp_only_rank_0_logs(tmp_path):
    """Two gloo processes: one MLflow run and one TensorBoard writer, with each step once."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitkit.cli",
           "train", *[a for item in [*TINY, "train.epochs=1", BOTH] for a in ("--set", item)], "--output-dir", str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    client, run_id = _mlflow(run)
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    steps = [s for s, _ in _expected(run)["train_loss"]]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == steps
    assert [e.step for e in _board(run).Scalars("train_loss")] == steps
