"""Bad input gets one clear line and a non-zero exit, before any work starts (issue #12).

Every case here was found by probing vitkit as a hostile user would: recipes, ``--set`` values, checkpoints,
converter inputs and Python API calls. Each asserts vitkit's own error type (the CLI: exit code 2 and a single
stderr line that names the key, file or shape), never a traceback and never a run that trains the wrong thing.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.cli import main as cli_main
from vitkit.engine import load_config
from vitkit.engine.config import RunConfig
from vitkit.errors import CheckpointError, ConfigError, DataError, InputShapeError, VitkitError

# The tiny digits run of test_engine: errors must come before training, so nothing here trains for long.
TINY = [
    "data.name=digits", "model.name=vit_fmnist_tiny", "model.args.img_size=8", "model.args.patch_size=2",
    "model.args.embed_dim=16", "model.args.depth=2", "model.args.num_heads=2", "train.batch_size=64",
    "train.progress=false", "train.epochs=1", "train.max_steps=1",
]


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli_main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line(code: int, err: str, match: str) -> None:
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ train
TRAIN_CASES = [
    ("optim.lr=[1,", "--set optim.lr=[1,: the value is not valid YAML"),
    ("model.args=[1,2]", "--set model.args=[1,2]: the value does not have the structure of its key"),
    ("model.name=bogus", "model.name='bogus' is not a registered model"),
    ("model.args.bogus=1", "model.args: vit_fmnist_tiny does not take bogus"),
    ("model.args.img_size=7", "img_size (7, 7) is not divisible by the patch stride 2"),
    ("train.threads=-1", "train.threads=-1 must be an integer >= 1"),
    ("optim.betas=[2.0,-1.0]", "optim.betas=[2.0, -1.0] must be two numbers in [0, 1)"),
    ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
    ("optim.clip_grad=-1", "optim.clip_grad=-1.0 must be a finite number > 0, or null"),
    ("schedule.min_lr=-1", "schedule.min_lr=-1.0 must be a finite number >= 0"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number > 0"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),
    ("model.args.num_classes=-1", "num_classes=-1 (must be >= 0"),
    ("train.max_steps=-1", "train.max_steps=-1 must be an integer >= 1, or null"),
    ("train.eval_every=0", "train.eval_every=0 must be an integer >= 1"),
    ("train.eval_batch_size=0", "train.eval_batch_size=0 must be an integer >= 1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be a finite number >= 0"),
    ("model.args.num_classes=3", "model.args.num_classes=3 but the training data has 10 classes"),
    ("model.args.drop_path_rate=1.5", "drop_path_rate=1.5 (must be in [0, 1))"),
]


@pytest.mark.parametrize("override,match", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_rejects_bad_settings_in_one_line(override, match, tmp_path, capsys):
    argv = ["train", *[a for item in TINY for a in ("--set", item)], "--set", override,
            "--output-dir", str(tmp_path / "run")]
    _assert_one_line(*_run_cli(argv, capsys), match)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_the_divisibility_hint_appears_only_where_it_belongs():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.lr=-1"])
    assert "divisible" not in str(info.value)
    with pytest.raises(ConfigError, match="train.batch_size=10 must be divisible by train.grad_accum=3"):
        load_config(None, ["train.batch_size=10", "train.grad_accum=3"])


def test_output_dir_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["train", *[a for item in TINY for a in ("--set", item)], "--output-dir", str(blocker / "run")]
    _assert_one_line(*_run_cli(argv, capsys), str(blocker))


def test_recipe_whose_top_level_is_a_list(tmp_path, capsys):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- optim\n- lr\n")
    _assert_one_line(*_run_cli(["train", "--config", str(recipe)], capsys), "the top level must be a mapping")


# ------------------------------------------------------------------------------------------------ checkpoints
def _tiny_checkpoint(folder: Path, **pretrained_cfg) -> Path:
    torch.manual_seed(0)
    model = vitkit.create_model("vit_fmnist_tiny", img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5,), "std": (0.5,), **pretrained_cfg}
    model.save_pretrained(folder)
    return folder


def _png(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("topk", ["-1", "0"])
def test_predict_topk_must_be_positive(topk, tmp_path, capsys):
    ck = _tiny_checkpoint(tmp_path / "ck")
    argv = ["predict", str(ck), str(_png(tmp_path / "a.png")), "--topk", topk]
    _assert_one_line(*_run_cli(argv, capsys), "--topk: must be an integer >= 1")
    with pytest.raises(ConfigError, match="topk"):
        vitkit.tools.predict_images(vitkit.tools.load_model(ck), [tmp_path / "a.png"], topk=int(topk))


def test_eval_rejects_bad_checkpoint_config_and_batch_size(tmp_path, capsys):
    ck = _tiny_checkpoint(tmp_path / "ck", class_names=[str(i) for i in range(10)])
    _assert_one_line(*_run_cli(["eval", str(ck), "--data", "digits", "--batch-size", "0"], capsys),
                     "--batch-size: must be an integer >= 1")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_args"]["num_heads"] = 5  # does not divide embed_dim=16: a ValueError inside the constructor
    (ck / "config.json").write_text(json.dumps(cfg))
    _assert_one_line(*_run_cli(["eval", str(ck), "--data", "digits"], capsys),
                     "config.json: model_args do not fit VisionTransformer")
    cfg["model_args"] = [1, 2]
    (ck / "config.json").write_text(json.dumps(cfg))
    _assert_one_line(*_run_cli(["eval", str(ck), "--data", "digits"], capsys), "model_args must be a JSON object")


def test_eval_refuses_nan_weights_and_other_class_names(tmp_path, capsys):
    ck = _tiny_checkpoint(tmp_path / "ck", class_names=[f"digit {i}" for i in range(10)])
    code, err = _run_cli(["eval", str(ck), "--data", "digits"], capsys)
    _assert_one_line(code, err, "was trained on other classes than the digits test set")
    assert "--ignore-class-names" in err
    assert cli_main(["eval", str(ck), "--data", "digits", "--ignore-class-names"]) == 0
    capsys.readouterr()  # its report and progress bar
    state = load_file(str(ck / "model.safetensors"))
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(state, str(ck / "model.safetensors"))
    _assert_one_line(*_run_cli(["eval", str(ck), "--data", "digits", "--ignore-class-names"], capsys),
                     "1 tensors hold NaN or infinite values (blocks.0.attn.qkv.weight)")


# ------------------------------------------------------------------------------------------------ converters
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=48, num_labels=3)
    folder = tmp_path_factory.mktemp("hf") / "vit"
    ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


def _edited(hf_folder: Path, tmp_path: Path, config=None, state=None) -> Path:
    out = tmp_path / "edited"
    out.mkdir()
    cfg = json.loads((hf_folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    weights = load_file(str(hf_folder / "model.safetensors"))
    save_file(state(weights) if state else weights, str(out / "model.safetensors"))
    return out


def _drop(cfg: dict, key: str) -> dict:
    cfg.pop(key)
    return cfg


CONVERT_CASES = {
    "no_hidden_size": (dict(config=lambda c: _drop(c, "hidden_size")), "key 'hidden_size' is missing"),
    "no_heads": (dict(config=lambda c: _drop(c, "num_attention_heads")), "key 'num_attention_heads' is missing"),
    "heads_do_not_divide": (dict(config=lambda c: {**c, "num_attention_heads": 5}),
                            "cannot build a VisionTransformer: embed dim 24 must be divisible by num_heads 5"),
    "no_classifier_bias": (dict(state=lambda s: {k: v for k, v in s.items() if k != "classifier.bias"}),
                           "classifier.weight is there but classifier.bias is missing"),
}


@pytest.mark.parametrize("case", list(CONVERT_CASES))
def test_convert_bad_hf_folders(case, hf_folder, tmp_path, capsys):
    edits, match = CONVERT_CASES[case]
    src = _edited(hf_folder, tmp_path, **edits)
    _assert_one_line(*_run_cli(["convert", "hf-vit", str(src), str(tmp_path / "out")], capsys), match)
    assert not (tmp_path / "out").exists()


def test_convert_bad_index_destination_and_arg(hf_folder, tmp_path, capsys):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((hf_folder / "config.json").read_text())
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    _assert_one_line(*_run_cli(["convert", "hf-vit", str(sharded), str(tmp_path / "o1")], capsys),
                     "'weight_map' must be an object")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _assert_one_line(*_run_cli(["convert", "hf-vit", str(hf_folder), str(blocker / "out")], capsys),
                     f"cannot write the destination {blocker / 'out'}")
    _assert_one_line(*_run_cli(["convert", "hf-vit", str(hf_folder), str(tmp_path / "o2"), "--arg", "bogus=1"],
                               capsys), "--arg bogus: VisionTransformer does not take it")
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------------ Python API
def _tiny_vit():
    torch.manual_seed(0)
    return vitkit.create_model("vit_fmnist_tiny", embed_dim=16, depth=2, num_heads=2).eval()


def test_half_precision_inputs_are_cast_and_integers_refused():
    model = _tiny_vit()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            out = model(x.to(dtype))
            assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1, dtype
    for dtype in (torch.uint8, torch.int64, torch.bool):
        with pytest.raises(InputShapeError, match=f"floating-point images, got {dtype}"):
            model(x.to(dtype))
    with pytest.raises(InputShapeError, match="torch.Tensor"):
        model(x.numpy())


def test_forward_intermediates_refuses_blocks_it_does_not_have():
    model = _tiny_vit()
    x = torch.randn(1, 1, 28, 28)
    for indices in ([5], [2], [-3], 3, 0, [], ["1"]):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=indices)
    assert len(model.forward_intermediates(x, indices=[-1, 0], intermediates_only=True)) == 2


def test_create_model_errors_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean vit_fmnist_tiny"):
        vitkit.create_model("vit_fmnist_tinyy")
    with pytest.raises(ConfigError, match="unexpected keyword argument 'bogus'"):
        vitkit.create_model("vit_fmnist_tiny", bogus=1)
    for bad in (dict(num_classes=-1), dict(embed_dim=0), dict(depth=-2), dict(in_chans=0), dict(img_size=7)):
        with pytest.raises(ConfigError):
            vitkit.create_model("vit_fmnist_tiny", **bad)


def test_normalisation_follows_the_channel_count():
    rgb = vitkit.create_model("vit_fmnist_tiny", in_chans=3)
    assert rgb.pretrained_cfg["mean"] == pytest.approx((0.2860,) * 3)
    assert len(rgb.pretrained_cfg["std"]) == 3
    gray = vitkit.create_model("vit_tiny_patch16_224", in_chans=1, depth=1)
    assert len(gray.pretrained_cfg["mean"]) == 1 and len(gray.pretrained_cfg["std"]) == 1


def test_predict_with_an_rgb_fmnist_model(tmp_path):
    model = vitkit.create_model("vit_fmnist_tiny", in_chans=3, embed_dim=16, depth=1, num_heads=2)
    model.save_pretrained(tmp_path / "ck")
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8)).save(img)
    (result,) = vitkit.tools.predict_images(vitkit.tools.load_model(tmp_path / "ck"), [img], topk=2)
    assert len(result["top"]) == 2


# ------------------------------------------------------------------------------------------------ fuzz
def _leaf_keys() -> list[str]:
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    keys = []

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                keys.append(f"{prefix}{k}")

    walk(container, "")
    return keys


_FUZZ_VALUES = [
    "0", "-1", "1", "2", "7", "1e12", "-1e-9", "1e309", "inf", "-inf", "nan", ".nan", "true", "false", "null", "~",
    "''", "abc", "[1,", "[1,2]", "[2.0,-1.0]", "[]", "{a: 1}", "{}", "!!python/object:os.system", "&a 1", "*a",
    "'unclosed", '"', "0x10", "1_000", "3.5", "-0.0", "[[1]]", "{name: mae}", "classify", "mae", "auto", "yes",
    "vit_fmnist_tiny", "digits", "pad_crop", "%", ":", "- 1", "1: 2", "\t", "\\x00", "9" * 40,
]
_EXTRA_KEYS = ["model.args.img_size", "model.args.num_classes", "model.args.depth", "model.args.embed_dim",
               "model.args.num_heads", "model.args.pos_embed", "model.args.drop_path_rate", "model.args.bogus",
               "task", "task.args.mask_ratio", "task.args.bogus", "nonsense", "optim", "train", "", ".", "a..b",
               "optim.betas.0", "model.args"]


def test_fuzzed_overrides_fail_only_with_vitkit_errors():
    """Seeded and bounded: a few thousand overrides, each valid or refused with one of vitkit's errors."""
    rng = random.Random(12)
    keys = _leaf_keys() + _EXTRA_KEYS
    outcomes = {"valid": 0, "refused": 0}
    foreign = []
    for i in range(2500):
        overrides = [f"{rng.choice(keys)}={rng.choice(_FUZZ_VALUES)}" for _ in range(rng.randint(1, 3))]
        if i % 50 == 0:
            overrides.append(rng.choice(["=1", "novalue", "x=", "==", "a.b.c.d=1"]))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_config(None, overrides)
            outcomes["valid"] += 1
        except VitkitError as e:
            assert "\n" not in str(e).strip() or "did you mean" in str(e), (overrides, str(e))
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - this is what the test is looking for
            foreign.append((overrides, f"{type(e).__name__}: {e}"))
    assert not foreign, f"{len(foreign)} of 2500 raised a foreign error, e.g. {foreign[:3]}; outcomes {outcomes}"
    assert outcomes["valid"] > 100 and outcomes["refused"] > 1000, outcomes


def test_error_types_stay_catchable_as_python_errors():
    """ConfigError is a ValueError and every data/checkpoint error a VitkitError, so callers can catch either."""
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, VitkitError)
    assert issubclass(DataError, VitkitError) and issubclass(CheckpointError, VitkitError)


def test_tilde_resets_a_key_to_its_default():
    recipe = Path(__file__).resolve().parents[1] / "configs/fmnist/ablation.yaml"
    cfg = load_config(recipe, ["~model.args", "model.args.depth=2"])
    assert cfg.model.args == {"depth": 2}
    assert load_config(recipe).model.args["embed_dim"] == 64
    with pytest.raises(ConfigError, match="'bogus.key' is not a setting"):
        load_config(None, ["~bogus.key"])
