"""Hostile files given to every converter and loader: a pickle that runs code, truncated safetensors, configs that
claim huge models. Each is refused with one line, nothing is executed and nothing is allocated."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from vitkit.cli import main
from vitkit.convert import CONVERTERS, convert
from vitkit.errors import VitkitError

transformers = pytest.importorskip("transformers")

# kinds that read a folder with the library's config.json next to the weights
HF_CONFIGS = {
    "hf-vit": lambda: transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32),
    "hf-vit-mae": lambda: transformers.ViTMAEConfig(image_size=16, patch_size=4, hidden_size=16,
                                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
    "hf-swin": lambda: transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1],
                                               num_heads=[1], window_size=4),
    "hf-clip": lambda: transformers.CLIPConfig(),
    "hf-vilt": lambda: transformers.ViltConfig(),
}
HUGE = {"hf-vit": {"hidden_size": 65536, "num_hidden_layers": 4096, "num_attention_heads": 64,
                   "intermediate_size": 262144},
        "hf-vit-mae": {"hidden_size": 65536, "num_hidden_layers": 4096, "num_attention_heads": 64,
                       "intermediate_size": 262144}}


class _RunsCode:
    """Unpickling this calls os.system: a loader that runs pickles would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _source(kind: str, folder, weights_name: str):
    """Where ``kind`` reads: a folder with a valid config and ``weights_name`` for HF kinds, else the file."""
    if kind in HF_CONFIGS:
        folder.mkdir(parents=True, exist_ok=True)
        HF_CONFIGS[kind]().to_json_file(folder / "config.json")
        return folder, folder / weights_name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("model.pth" if weights_name.endswith(".bin") else "model.safetensors")
    return path, path


def _one_line(err: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
def test_a_pickle_that_runs_code_is_refused_and_never_run(kind, tmp_path, capsys):
    marker = tmp_path / "executed"
    src, weights = _source(kind, tmp_path / "src", "pytorch_model.bin")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": _RunsCode(marker)}, weights)
    code = main(["convert", kind, str(src), str(tmp_path / "dst"), *_required_args(kind)])
    err = capsys.readouterr().err
    assert code != 0 and not marker.exists()
    _one_line(err)
    assert "code execution" in err or "refused" in err or "not" in err


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
def test_truncated_safetensors_is_one_line(kind, tmp_path, capsys):
    src, weights = _source(kind, tmp_path / "src", "model.safetensors")
    save_file({"w": torch.zeros(64, 64)}, str(weights))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code = main(["convert", kind, str(src), str(tmp_path / "dst"), *_required_args(kind)])
    err = capsys.readouterr().err
    assert code != 0 and not (tmp_path / "dst" / "model.safetensors").exists()
    _one_line(err)


@pytest.mark.parametrize("kind", sorted(HUGE))
def test_a_config_claiming_a_huge_model_is_refused_before_reading_weights(kind, tmp_path):
    src, weights = _source(kind, tmp_path / "src", "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(HUGE[kind])
    (src / "config.json").write_text(json.dumps(cfg))
    save_file({"w": torch.zeros(1)}, str(weights))
    with pytest.raises(VitkitError) as info:
        convert(kind, str(src), str(tmp_path / "dst"))
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


def test_auto_loading_a_hostile_folder_is_refused(tmp_path):
    marker = tmp_path / "executed"
    folder = tmp_path / "hf"
    folder.mkdir()
    HF_CONFIGS["hf-vit"]().to_json_file(folder / "config.json")
    torch.save({"evil": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(VitkitError, match="code execution"):
        vitkit.from_pretrained(folder)
    assert not marker.exists()


def _required_args(kind: str) -> list[str]:
    """--arg values a converter requires before it reads anything, so the file itself is what is refused."""
    needed = [a for a in vitkit.convert.CONVERTER_ARGS.get(kind, ()) if a.required]
    return [x for a in needed for x in ("--arg", f"{a.name}={_dummy(a.name)}")]


def _dummy(name: str) -> str:
    return "2" if "heads" in name else "vit" if name == "family" else "1"
