"""docs/checkpoints.md works as written: its round trip (timm -> vitkit fine-tune -> Hugging Face) runs command by
command, with the hub repository replaced by a tiny random timm ViT in a temporary cache (no network) and one epoch.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from _peers import import_peer
from test_readme import ROOT, code_blocks, commands
from vitkit.cli import main
from vitkit.convert.auto import load_checkpoint

DOC = ROOT / "docs" / "checkpoints.md"
BLOCKS = code_blocks(DOC.read_text(encoding="utf-8"))
TINY = ["train.epochs=1", "train.batch_size=4", "train.progress=false"]


def _walk():
    found = [body for lang, walk, body in BLOCKS if lang == "bash" and walk == "round-trip"]
    assert found, "docs/checkpoints.md lost its <!-- walk: round-trip --> block"
    return commands(found[0])


def _cache_tiny_timm_vit(cache, repo_id: str) -> None:
    """A timm hub folder (config.json as timm's push_to_hf_hub writes it + model.safetensors) under ``repo_id``."""
    timm = import_peer("timm")
    name = repo_id.split("/")[1].split(".")[0]
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **args)
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({
        "architecture": name, "num_classes": 5, "num_features": 32, "global_pool": "token", "model_args": args,
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                           "interpolation": "bicubic", "crop_pct": 0.9}}))


def _images(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for k, label in enumerate(("apple", "pear", "plum")):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 60 * k, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


def test_the_round_trip_runs_as_written(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    steps = _walk()
    repo_ids = [a[len("hf-hub:"):] for argv in steps for a in argv if a.startswith("hf-hub:")]
    assert repo_ids, "the round trip no longer starts from a hub id"
    cache = tmp_path / "hf-cache"
    for repo_id in set(repo_ids):
        _cache_tiny_timm_vit(cache, repo_id)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    _images(tmp_path / "my_images")
    monkeypatch.chdir(tmp_path)
    for argv in steps:
        assert argv[0] == "vitkit", f"docs/checkpoints.md: {' '.join(argv)} is not a vitkit command"
        args = argv[1:]
        if args[0] == "train":
            args += [x for o in TINY for x in ("--set", o)]
        assert main(args) == 0, f"docs/checkpoints.md: `{' '.join(argv)}` failed"
    python = [body for lang, _, body in BLOCKS if lang == "python"]
    scope: dict = {}
    exec(compile(python[0], str(DOC), "exec"), scope)  # the doc's own Python lines
    hf, processor = scope["model"].eval(), scope["processor"]
    assert hf.config.id2label == {0: "apple", 1: "pear", 2: "plum"}
    ours = load_checkpoint("runs/vit_tiny_ft").eval()
    image = Image.open("my_images/val/pear/0.png")
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape[-2:]) == (64, 64)
    with torch.no_grad():
        assert (hf(pixel_values=pixels).logits - ours(pixels)).abs().max() <= 1e-5
    assert isinstance(hf, transformers.ViTForImageClassification)
    shutil.rmtree(cache)  # nothing after the conversion needs the hub
