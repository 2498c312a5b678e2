"""Experiment trackers (``train.loggers: [tensorboard, mlflow]``): what the run writes, also sent elsewhere.

Every metric the trainer writes to ``metrics.jsonl`` (with its ``step``), the final test metrics, the resolved
config (flattened to dotted keys) and the run folder's pictures reach each logger. Only rank 0 opens loggers.
A resumed run continues the same TensorBoard folder (events a crash left after the checkpoint are purged, as
``metrics.jsonl`` is cut back) and the same MLflow run (its id is kept in ``<run>/mlflow_run.json``).

A tracker that fails during training warns once and is dropped: a tracking server going down must not cost
the training. Opening one fails with one line (the extra to install, or the setting at fault).
"""

from __future__ import annotations

import json
import numbers
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from ..utils import require_extra

LOGGERS = ("tensorboard", "mlflow")
MLFLOW_RUN_FILE = "mlflow_run.json"  # where a run folder keeps its MLflow run id, for --resume


@dataclass
class TensorBoardArgs:
    log_dir: str | None = None  # null: <run>/tensorboard


@dataclass
class MLflowArgs:
    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else a file store in <run>/mlruns
    experiment: str | None = None  # null: the recipe's name, else "vitkit"
    run_name: str | None = None  # null: the run folder's name


@dataclass
class LoggerArgs:
    """``train.logger_args``: the settings of each logger, typed so a misspelt key fails by name."""

    tensorboard: TensorBoardArgs = field(default_factory=TensorBoardArgs)
    mlflow: MLflowArgs = field(default_factory=MLflowArgs)


class Logger(Protocol):
    """One tracker. Metrics are plain floats keyed as in ``metrics.jsonl``; pictures are PNG files."""

    name: str

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_pictures(self, paths: Sequence[Path], step: int) -> None: ...

    def close(self, status: str) -> None: ...


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``; an empty mapping stays one key (``{}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def numbers_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of a ``metrics.jsonl`` record: its numbers, without the ``step`` they are logged at."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, numbers.Real)}


# ---------------------------------------------------------------------------------------------------- TensorBoard
class TensorBoardLogger:
    """Scalars, the config (text and hparams) and the pictures (images) in one TensorBoard folder."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, *, config: Mapping[str, Any], config_yaml: str, primary: str, step: int,
                 history: Sequence[Mapping[str, Any]]) -> None:
        board = require_extra("torch.utils.tensorboard", "track", "train.loggers: tensorboard")
        from torch.utils.tensorboard.summary import hparams

        fresh = not any(Path(log_dir).glob("events.out.tfevents.*"))
        # purge_step hides what an earlier session logged from this step on: for a fresh run everything (an
        # overwritten run's events), on resume what a crash logged after the checkpoint (metrics.jsonl is cut too)
        self.writer = board.SummaryWriter(str(log_dir), purge_step=step + 1 if step else 0)
        self.writer.add_text("config", "\n".join("    " + line for line in config_yaml.splitlines()), step)
        values = {k: v if isinstance(v, (bool, int, float, str)) else _text(v) for k, v in flatten(config).items()}
        experiment, start, self._end = hparams(values, {primary: 0.0})
        if fresh or not step:
            self.writer.file_writer.add_summary(experiment)
            self.writer.file_writer.add_summary(start)
            for record in history if step else ():  # first enabled on resume: what the run logged so far
                self.log_metrics(numbers_of(record), record["step"])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_pictures(self, paths: Sequence[Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        for path in paths:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(path.stem, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self, status: str) -> None:
        if status == "FINISHED":
            self.writer.file_writer.add_summary(self._end)
        self.writer.close()


# ---------------------------------------------------------------------------------------------------- MLflow
def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri and ":" not in uri.split("/")[0]


class MLflowLogger:
    """Metrics, params (the config; long values cut to MLflow's limit, the whole YAML as ``config.yaml``) and
    the pictures as artifacts of one MLflow run, continued on resume."""

    name = "mlflow"

    def __init__(self, run_dir: Path, args: MLflowArgs, *, config: Mapping[str, Any], config_yaml: str, step: int,
                 history: Sequence[Mapping[str, Any]]) -> None:
        require_extra("mlflow", "track", "train.loggers: mlflow")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir.resolve() / "mlruns").as_uri()
        if _is_file_store(uri):
            # MLflow 3 refuses a file store unless asked for; a local store is what this default promises
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.id_file = run_dir / MLFLOW_RUN_FILE
        try:
            self.client = MlflowClient(uri)
            self._start(args, run_dir, uri, config, config_yaml, step, history)
        except MlflowException as e:
            raise ConfigError(f"train.loggers: mlflow at {uri} (train.logger_args.mlflow.tracking_uri): "
                              f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None

    def _start(self, args: MLflowArgs, run_dir: Path, uri: str, config: Mapping[str, Any], config_yaml: str,
               step: int, history: Sequence[Mapping[str, Any]]) -> None:
        """Create or continue the run, log the params and the config, and what the run logged before."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        run = self._continued_run(step)
        if run is None:
            name = args.experiment or "vitkit"
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
            run = self.client.create_run(experiment, run_name=args.run_name or run_dir.resolve().name,
                                         tags={"vitkit.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        self.id_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": uri}) + "\n", encoding="utf-8")

        values = {k: _text(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(config).items()}
        logged = run.data.params
        params = [Param(k, v) for k, v in values.items() if k not in logged]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        for key, value in values.items():  # a param cannot change: a resumed run's new value is a tag
            if key in logged and logged[key] != value:
                self.client.set_tag(self.run_id, f"changed_on_resume.{key}", value)
        self.client.log_text(self.run_id, config_yaml, "config.yaml")
        if history:  # what the run logged before this logger was enabled
            done = {m.step for m in self.client.get_metric_history(self.run_id, "epoch")}
            for record in history:
                if record["step"] not in done:
                    self.log_metrics(numbers_of(record), record["step"])

    def _continued_run(self, step: int):
        """The MLflow run of this run folder, when resuming (``step > 0``) and the tracking store still has it."""
        if not step or not self.id_file.is_file():
            return None
        from mlflow.exceptions import MlflowException

        try:
            run_id = json.loads(self.id_file.read_text(encoding="utf-8"))["run_id"]
            run = self.client.get_run(run_id)
        except (MlflowException, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"train.loggers: mlflow: {self.id_file} names no run of this tracking store "
                          f"({type(e).__name__}); starting a new MLflow run", stacklevel=3)
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        return run

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH])

    def log_pictures(self, paths: Sequence[Path], step: int) -> None:
        for path in paths:  # the latest version of each picture (an artifact is replaced, not versioned)
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


# ---------------------------------------------------------------------------------------------------- fan-out
class Loggers:
    """Every configured logger behind one call; empty (every call a no-op) without ``train.loggers`` or off
    rank 0. Pictures are sent when they changed since the last call."""

    def __init__(self, loggers: Sequence[Logger] = ()) -> None:
        self.loggers = list(loggers)
        self._seen: dict[Path, tuple[int, int]] = {}

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def _each(self, call) -> None:
        for logger in list(self.loggers):
            try:
                call(logger)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must not stop the training
                self.loggers.remove(logger)
                warnings.warn(f"train.loggers: {logger.name} failed ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]}); the run goes on without it", stacklevel=3)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        values = numbers_of(metrics)
        if values:
            self._each(lambda logger: logger.log_metrics(values, step))

    def log_pictures(self, folder: Path, step: int) -> None:
        """The PNGs in ``folder`` (curves.png and the task's pictures) that are new or rewritten."""
        if not self.loggers:
            return
        changed = []
        for path in sorted(Path(folder).glob("*.png")):
            stat = path.stat()
            if self._seen.get(path) != (stat.st_mtime_ns, stat.st_size):
                self._seen[path] = (stat.st_mtime_ns, stat.st_size)
                changed.append(path)
        if changed:
            self._each(lambda logger: logger.log_pictures(changed, step))

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close every logger: FINISHED, FAILED (an exception) or KILLED (interrupted)."""
        self._each(lambda logger: logger.close(status))
        self.loggers = []


def open_loggers(names: Sequence[str], args: LoggerArgs, run_dir: Path, *, config: Mapping[str, Any],
                 config_yaml: str, primary: str, step: int = 0,
                 history: Sequence[Mapping[str, Any]] = ()) -> Loggers:
    """The loggers ``train.loggers`` names, for the run in ``run_dir`` at ``step`` (> 0: resumed, with the
    checkpoint's ``history``). ``primary`` is the metric the TensorBoard hparams view shows."""
    opened: list[Logger] = []
    try:
        for name in names:
            if name == "tensorboard":
                log_dir = Path(args.tensorboard.log_dir) if args.tensorboard.log_dir else run_dir / "tensorboard"
                opened.append(TensorBoardLogger(log_dir, config=config, config_yaml=config_yaml, primary=primary,
                                                step=step, history=history))
            elif name == "mlflow":
                opened.append(MLflowLogger(run_dir, args.mlflow, config=config, config_yaml=config_yaml, step=step,
                                           history=history))
            else:
                raise ConfigError(f"train.loggers: {name!r} is not a logger; choices: {', '.join(LOGGERS)}")
    except BaseException:
        Loggers(opened).close("FAILED")
        raise
    return Loggers(opened)
