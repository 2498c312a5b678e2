"""benchmarks/bench_train.py and bench_mae.py: raw records appended per run, their tables rebuilt from them alone."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from vitkit.errors import ConfigError
from vitkit.tools.report import load_script

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiniest timing: two kept samples of one step each, every sample kept, no waiting for a quiet machine
TINY = ["--samples", "2", "--min-sample-seconds", "0.01", "--max-contention", "1.0", "--max-wait", "0",
        "--threads", "1"]


@pytest.fixture(scope="module")
def train():
    return load_script(ROOT / "benchmarks" / "bench_train.py")


@pytest.fixture(scope="module")
def mae():
    return load_script(ROOT / "benchmarks" / "bench_mae.py")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _table(text: str) -> list[dict[str, str]]:
    """The rows of the markdown table in ``text`` as {column: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def _check_run(records: list[dict], cells: int) -> tuple[dict, list[dict]]:
    """meta first, end last, one run; every cell with positive samples and a measured contention per sample."""
    meta, end = records[0], records[-1]
    assert meta["kind"] == "meta" and end["kind"] == "end"
    assert {r["run_id"] for r in records} == {meta["run_id"]}
    assert {"cpu", "cpu_flags", "cores", "threads", "torch", "python", "native_bf16"} <= set(meta["machine"])
    assert meta["settings"]["max_contention"] == 1.0 and meta["settings"]["samples"] == 2
    assert end["seconds"] > 0
    found = [r for r in records if r["kind"] == "cell"]
    assert len(found) == cells
    for c in found:
        assert len(c["samples_ms"]) == len(c["contention"]) == 2
        assert all(s > 0 for s in c["samples_ms"])
        assert all(x is not None and 0 <= x <= 1 for x in c["contention"])
        assert c["discarded"] == 0 and c["note"] == ""
    return meta, found


def test_train_step_records_and_table(train, tmp_path):
    path = tmp_path / "results" / "train_step.jsonl"
    assert train.main(["--precisions", "fp32", "--batch-size", "8", "--warmup", "1", "--no-rss", "--out",
                       str(tmp_path / "runs"), "--results", str(path), *TINY]) == 0
    records = _records(path)
    meta, cells = _check_run(records, cells=2)
    assert "--no-rss" in meta["command"] and meta["settings"]["rss"] is False
    assert [(c["model"], c["precision"]) for c in cells] == [("vitkit", "fp32"), ("transformers", "fp32")]
    assert all(c["batch_size"] == 8 and c["params"] > 0 and c["peak_rss_mib"] is None for c in cells)

    img_s = {c["model"]: 8e3 / statistics.median(c["samples_ms"]) for c in cells}
    rows = {r["model"]: r for r in _table(train.render_train_step(tmp_path, results="results/train_step.jsonl"))}
    assert set(rows) == {"vitkit", "transformers"}
    for model, cell in zip(("vitkit", "transformers"), cells):
        row = rows[model]
        assert row["precision"] == "fp32" and row["params"] == f"{cell['params'] / 1e6:.3f}M"
        assert float(row["train img/s"]) == pytest.approx(img_s[model], abs=0.5)
        assert row["peak RSS (MiB)"] == "—"
        contention = statistics.median(cell["contention"])
        assert row["median contention"] == f"{100 * contention:.1f}%"
    assert rows["vitkit"]["vs transformers"] == f"**{img_s['vitkit'] / img_s['transformers']:.2f}×**"
    assert rows["transformers"]["vs transformers"] == "1.00×"
    line = train.render_train_step(tmp_path, results="results/train_step.jsonl", part="machine")
    assert line.startswith(f"Run {meta['run_id']}:") and meta["command"] in line and "transformers " in line

    # marks: a contended cell (median contention above the run's threshold) and one without a clean sample
    meta["settings"]["max_contention"] = 0.1
    cells[0]["contention"] = [0.5, 0.05, 0.3]
    cells[0]["samples_ms"] = cells[0]["samples_ms"] + [cells[0]["samples_ms"][0]]
    cells[1]["note"], cells[1]["contention"] = "noisy", [None, None]
    _write(tmp_path / "marked.jsonl", records)
    marked = {r["model"]: r for r in _table(train.render_train_step(tmp_path, results="marked.jsonl"))}
    assert marked["vitkit"]["train img/s"].endswith("*") and marked["vitkit"]["median contention"] == "30.0%"
    assert marked["transformers"]["train img/s"].endswith("†") and marked["transformers"]["median contention"] == "—"
    with pytest.raises(ConfigError, match="part="):
        train.render_train_step(tmp_path, results="marked.jsonl", part="other")


def test_train_step_peak_rss_child(train, tmp_path):
    path = tmp_path / "train_step.jsonl"
    assert train.main(["--models", "vitkit", "--precisions", "fp32", "--batch-size", "8", "--warmup", "0",
                       "--rss-steps", "1", "--out", str(tmp_path / "runs"), "--results", str(path), *TINY]) == 0
    _, cells = _check_run(_records(path), cells=1)
    assert cells[0]["peak_rss_mib"] > 50  # torch alone takes more than that
    row = _table(train.render_train_step(tmp_path, results="train_step.jsonl"))[0]
    assert row["peak RSS (MiB)"] == f"{cells[0]['peak_rss_mib']:.0f}" and row["vs transformers"] == "—"


def test_mae_step_records_and_tables(mae, tmp_path):
    path = tmp_path / "mae_step.jsonl"
    assert mae.main(["--cases", "fmnist_tiny:fp32", "--warmup", "0", "--profile", "--profile-rows", "5",
                     "--results", str(path), *TINY]) == 0
    records = _records(path)
    meta, cells = _check_run(records, cells=2)
    assert meta["settings"]["cases"] == ["fmnist_tiny:fp32"] and "--profile" in meta["command"]
    by_step = {c["step"]: c for c in cells}
    assert set(by_step) == {"mae", "full"} and {c["precision"] for c in cells} == {"fp32"}
    assert by_step["mae"]["encoder_tokens"] < by_step["full"]["encoder_tokens"]
    profile = next(r for r in records if r["kind"] == "profile")
    assert profile["case"] == "fmnist_tiny" and 0 < len(profile["top_ops"]) <= 5
    assert {p["phase"] for p in profile["phases"]} >= {"mae.backward", "mae.encoder (visible tokens)"}
    assert sum(p["share"] for p in profile["phases"]) == pytest.approx(1.0)

    ms = {k: statistics.median(c["samples_ms"]) for k, c in by_step.items()}
    spread = max((max(c["samples_ms"]) - min(c["samples_ms"])) / statistics.median(c["samples_ms"])
                  for c in cells)
    rows = _table(mae.render_mae_step(tmp_path, results="mae_step.jsonl"))
    assert len(rows) == 1
    row = rows[0]
    assert row["model"] == "FMNIST tiny, 28 (`mae_vit_fmnist_tiny`, decoder 64 × 2)"
    assert row["batch"] == "256" and row["precision"] == "fp32"
    assert row["encoder tokens (MAE / full)"] == f"{by_step['mae']['encoder_tokens']} / 50"
    for column, step in (("MAE step ms", "mae"), ("full-token step ms", "full")):
        tolerance = 0.5 if ms[step] >= 100 else 0.05
        assert float(row[column]) == pytest.approx(ms[step], abs=tolerance)
    assert row["full / MAE"] == f"**{ms['full'] / ms['mae']:.2f}**"
    assert row["spread"] == f"{100 * spread:.0f}%"
    contention = [f"{100 * statistics.median(by_step[k]['contention']):.1f}%" for k in ("mae", "full")]
    assert row["median contention (MAE / full)"] == " / ".join(contention)

    line = mae.render_mae_step(tmp_path, results="mae_step.jsonl", part="machine")
    assert line.startswith(f"Run {meta['run_id']}:") and meta["command"] in line
    ops = mae.render_mae_step(tmp_path, results="mae_step.jsonl", part="profile")
    assert f"| {profile['top_ops'][0]['op']} | {profile['top_ops'][0]['self_ms']:.1f} |" in ops

    # an interrupted later run is not "latest"; asked for by id, its table says it did not finish
    later = [json.loads(json.dumps(r)) | {"run_id": "later"} for r in records if r["kind"] != "end"]
    later[0]["settings"]["max_contention"] = 0.1
    next(r for r in later if r.get("step") == "mae")["contention"] = [0.5, 0.4]  # median 0.45 > 0.1: marked
    _write(path, records + later)
    assert _table(mae.render_mae_step(tmp_path, results="mae_step.jsonl")) == rows
    interrupted = mae.render_mae_step(tmp_path, results="mae_step.jsonl", run="later")
    assert "did not finish" in interrupted
    assert _table(interrupted)[0]["MAE step ms"].endswith("*")
    assert _table(interrupted)[0]["median contention (MAE / full)"].startswith("45.0% / ")
    with pytest.raises(ConfigError, match="no run 'other'"):
        mae.render_mae_step(tmp_path, results="mae_step.jsonl", run="other")
