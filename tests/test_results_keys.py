"""A study's committed records keep their keys: ``vitkit ablate`` skips a run whose key (the resolved config's hash)
is in the results file, so a change that moves keys (a new config field, a new constructor flag) would retrain every
study and duplicate its rows. Each record's overrides on its recipe must still give its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitkit.engine import load_config
from vitkit.tools.ablate import read_results, run_key

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "fmnist" / "ablation.yaml"
FILES = [ROOT / "docs" / "ablations" / "results.jsonl", ROOT / "docs" / "window" / "results.jsonl"]


@pytest.mark.parametrize("path", [p for p in FILES if p.is_file()], ids=lambda p: p.parent.name)
def test_recorded_keys_recompute_from_their_overrides(path):
    moved = [(r["variant"], r["seed"]) for r in read_results(path)
             if run_key(load_config(RECIPE, list(r["overrides"]))) != r["key"]]
    assert not moved, f"{path}: these records' keys moved (the next ablate would retrain them): {moved}"
