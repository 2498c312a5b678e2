"""Fine-tune any checkpoint from the CLI (model.name optional) and load hub ids from the local cache, offline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")

RECIPE = "configs/own/vit_folder.yaml"
SMALL = ["train.epochs=1", "train.batch_size=4", "train.progress=false", "train.bf16=false"]


def _hf_vit(folder, num_labels=5):
    """A transformers ViT of a configuration no registered vitkit name has (40 wide, 2 blocks, patch 4, 16 px)."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=40, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=80, num_labels=num_labels)
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(folder)
    return model


def _image_folder(root, classes=("ant", "bee", "cow")):
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for k, label in enumerate(classes):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(50 + 70 * k, 25, (30, 30, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def _fine_tune(tmp_path, pretrained, name="model.name=null"):
    root = _image_folder(tmp_path / "images")
    out = tmp_path / "run"
    code = main(["train", "--config", RECIPE, "--set", name, "--set", "~model.args",
                 "--set", f"model.pretrained={pretrained}", "--set", "model.args.img_size=24",
                 "--set", "data.image_size=24", "--set", f"data.root={root}", "--output-dir", str(out),
                 *[a for s in SMALL for a in ("--set", s)]])
    return code, out


def test_fine_tunes_a_converted_hf_vit_of_an_unregistered_config_at_new_size_and_classes(tmp_path, capsys):
    _hf_vit(tmp_path / "hf")
    assert main(["convert", "hf-vit", str(tmp_path / "hf"), str(tmp_path / "ck")]) == 0
    code, out = _fine_tune(tmp_path, tmp_path / "ck")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["final"]["count"] == 6
    model = vitkit.from_pretrained(out)  # the run's best checkpoint, rebuilt from its own config
    assert model.num_classes == 3 and tuple(model.pretrained_cfg["input_size"][1:]) == (24, 24)
    assert model.embed_dim == 40 and len(model.blocks) == 2
    trained = json.loads((out / "checkpoints" / "best" / "config.json").read_text())
    assert trained["pretrained_cfg"]["class_names"] == ["ant", "bee", "cow"]


def test_fine_tunes_a_hugging_face_folder_directly(tmp_path):
    _hf_vit(tmp_path / "hf")
    code, out = _fine_tune(tmp_path, tmp_path / "hf")
    assert code == 0 and json.loads((out / "summary.json").read_text())["finished"]


def test_a_registered_name_that_does_not_fit_says_to_drop_it(tmp_path, capsys):
    _hf_vit(tmp_path / "hf")
    main(["convert", "hf-vit", str(tmp_path / "hf"), str(tmp_path / "ck")])
    code, _ = _fine_tune(tmp_path, tmp_path / "ck", name="model.name=vit_fmnist_tiny")
    err = capsys.readouterr().err
    assert code != 0 and "model.name=null" in err and "Traceback" not in err


def test_a_checkpoint_given_as_model_name_is_pointed_to_model_pretrained(tmp_path):
    _hf_vit(tmp_path / "hf")
    with pytest.raises(ConfigError, match="model.pretrained="):
        vitkit.engine.load_config(RECIPE, [f"model.name={tmp_path / 'hf'}"])


# ---------------------------------------------------------------------------- hub ids, offline
def _populate_cache(cache, repo_id, files_from):
    """The layout huggingface_hub keeps: models--ORG--NAME/{refs/main, snapshots/SHA/<files>}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(files_from, repo / "snapshots" / sha)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_of_a_transformers_model_loads_from_the_cache_offline(tmp_path, offline_cache):
    hf = _hf_vit(tmp_path / "hf")
    _populate_cache(offline_cache, "someone/tiny-vit", tmp_path / "hf")
    model = vitkit.from_pretrained("hf-hub:someone/tiny-vit").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - hf(pixel_values=x).logits).abs().max() <= 1e-5


def test_hub_id_of_a_vitkit_checkpoint_in_create_model_and_recipes(tmp_path, offline_cache):
    source = vitkit.create_model("vit_fmnist_tiny", depth=1, num_classes=4)
    source.save_pretrained(tmp_path / "vk")
    _populate_cache(offline_cache, "someone/tiny-vitkit", tmp_path / "vk")
    loaded = vitkit.create_model("vit_fmnist_tiny", pretrained="hf-hub:someone/tiny-vitkit", depth=1, num_classes=4)
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert vitkit.models.from_pretrained("hf-hub:someone/tiny-vitkit").num_classes == 4


def test_hub_id_not_in_the_cache_offline_is_one_line_naming_it(offline_cache, capsys):
    with pytest.raises(CheckpointError, match=r"hf-hub:nobody/absent: not in the local Hugging Face cache .*"
                                              r"HF_HUB_OFFLINE"):
        vitkit.from_pretrained("hf-hub:nobody/absent")
    assert main(["eval", "hf-hub:nobody/absent"]) != 0
    err = capsys.readouterr().err.strip()
    assert "hf-hub:nobody/absent" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", ["hf-hub:", "hf-hub:a/b/c", "hf-hub:../x", "hf-hub:org/name@"])
def test_malformed_hub_ids_are_refused(bad, offline_cache):
    with pytest.raises(CheckpointError, match="not a hub id"):
        vitkit.from_pretrained(bad)


def test_predict_takes_a_hub_id_of_a_transformers_folder(tmp_path, offline_cache, capsys):
    _hf_vit(tmp_path / "hf")
    _populate_cache(offline_cache, "someone/tiny-vit", tmp_path / "hf")
    image = tmp_path / "x.png"
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(image)
    assert main(["predict", "hf-hub:someone/tiny-vit", str(image)]) == 0
    assert "x.png" in capsys.readouterr().out
