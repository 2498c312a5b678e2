"""Converters never guess silently (issue #30): each ``vitkit convert KIND`` has its own --help listing the --arg keys
its converter declares, an undeclared key is refused in one line, and a value that changes the outputs but that
neither the weights nor a config beside them tells is announced (``AssumedValueWarning``) or given."""

from __future__ import annotations

import inspect
import json
import shutil
import typing
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitkit.cli import build_parser, main
from vitkit.convert import CONVERTER_ARGS, CONVERTERS, convert
from vitkit.convert.efficientvit import load_efficientvit
from vitkit.convert.t2t import load_t2t
from vitkit.convert.var import infer_var_args, load_var_vqvae
from vitkit.errors import AssumedValueWarning, ConfigError
from vitkit.models.mae import MaskedAutoencoderViT
from vitkit.models.vit import VisionTransformer

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
EFFICIENTVIT = REFERENCE / "efficientvit" / "efficientvit_cls_weights.safetensors"
T2T = REFERENCE / "t2t_vit" / "t2t_vit_transformer_weights.safetensors"
VQVAE = REFERENCE / "var" / "var_vqvae_weights.safetensors"
VAR = REFERENCE / "var" / "var_var_weights.safetensors"
REF_PATCH_NUMS = [1, 2, 3, 4, 6, 8]  # the reference VQVAE's scales: the weights hold only their count


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(["convert", *argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.fixture()
def strict():
    """Any AssumedValueWarning is an error: what the test passes or ships must tell everything."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssumedValueWarning)
        yield


def _beside(tmp_path: Path, weights: Path, config: dict | None) -> Path:
    """A copy of ``weights`` in its own folder, with ``config`` as the config.json beside it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / weights.name
    shutil.copyfile(weights, path)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------------------------------- the CLI
def test_convert_help_lists_every_kind(capsys):
    out = _help(capsys)
    for kind in CONVERTERS:
        assert f"    {kind} " in out or f"    {kind}\n" in out, kind


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
def test_each_kind_has_its_own_help_with_its_keys(kind, capsys):
    out = _help(capsys, kind)
    assert out.startswith(f"usage: vitkit convert {kind} ") and "--arg KEY=VALUE" in out
    assert CONVERTER_ARGS[kind], f"{kind} declares no --arg keys"
    for spec in CONVERTER_ARGS[kind]:
        assert f"\n  {spec.name}: " in out, spec.name
    others = {a.name for k, specs in CONVERTER_ARGS.items() if k != kind for a in specs} - \
        {a.name for a in CONVERTER_ARGS[kind]}
    assert not [name for name in others if f"\n  {name}: " in out]  # its own keys, not every converter's


def test_the_usage_with_args_after_the_paths_still_parses():
    args = build_parser().parse_args(["convert", "hf-vit", "src", "dst", "--arg", "a=b", "--arg", "c=1"])
    assert (args.kind, args.src, args.dst, args.args) == ("hf-vit", "src", "dst", ["a=b", "c=1"])


def _target(kind: str) -> type | None:
    """The model class a converter returns (its return annotation), None where it is not one class."""
    hint = typing.get_type_hints(CONVERTERS[kind]).get("return")
    return hint if isinstance(hint, type) else None


@pytest.mark.parametrize("kind", sorted(k for k in CONVERTERS if _target(k) is not None))
def test_declared_keys_are_real_and_accepted(kind, tmp_path):
    """Each declared key is a constructor argument of the target class (an MAE passes the rest to its ViT encoder),
    an argument of the loader, or one the converter module reads itself; convert() lets all of them through."""
    fn, target = CONVERTERS[kind], _target(kind)
    module = inspect.getmodule(fn)
    accepted = set(inspect.signature(target.__init__).parameters)
    accepted |= set(inspect.signature(getattr(module, fn.__name__.replace("convert_", "load_", 1))).parameters)
    accepted |= set(getattr(module, "CONVERTER_KEYS", ())) | set(getattr(module, "_OWN_KEYS", ()))
    if target is MaskedAutoencoderViT:
        accepted |= set(inspect.signature(VisionTransformer.__init__).parameters)
    names = [a.name for a in CONVERTER_ARGS[kind]]
    assert len(names) == len(set(names)), f"{kind} declares a key twice"
    assert not set(names) - accepted, f"{kind} declares keys nothing reads: {sorted(set(names) - accepted)}"
    with pytest.raises(Exception) as info:  # noqa: B017 - whatever the missing source gives, not a refused key
        convert(kind, str(tmp_path / "missing"), str(tmp_path / "out"), **{n: 1 for n in names})
    assert "does not take" not in str(info.value)


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
def test_an_undeclared_key_is_refused_in_one_line(kind, tmp_path, capsys):
    code = main(["convert", kind, str(tmp_path / "missing"), str(tmp_path / "out"), "--arg", "bogus_key=1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--arg bogus_key:" in err and f"vitkit convert {kind} --help" in err
    assert all(a.name in err for a in CONVERTER_ARGS[kind])  # the line lists what it takes
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="bogus_key"):
        convert(kind, str(tmp_path / "missing"), str(tmp_path / "out"), bogus_key=1)


# ---------------------------------------------------------------------------------------------- EfficientViT
def test_efficientvit_announces_the_activation_it_assumes(tmp_path):
    with pytest.warns(AssumedValueWarning, match=r"assumed act='hardswish'.*--arg act="):
        assert load_efficientvit(EFFICIENTVIT).model_args["act"] == "hardswish"


def test_efficientvit_given_or_shipped_activation_is_not_announced(tmp_path, strict):
    assert main(["convert", "efficientvit", str(EFFICIENTVIT), str(tmp_path / "out"), "--arg", "act=hswish"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_args"]["act"] == "hardswish"
    # a config beside the weights in the official names (here: the one the reference was built from) tells it
    shipped = json.loads((EFFICIENTVIT.parent / "efficientvit_cls.json").read_text())
    assert shipped["backbone_args"]["act_func"] == "hswish"
    assert load_efficientvit(_beside(tmp_path / "a", EFFICIENTVIT, shipped)).model_args["act"] == "hardswish"
    gelu = load_efficientvit(_beside(tmp_path / "b", EFFICIENTVIT, {"act_func": "gelu"}))
    assert gelu.model_args["act"] == "gelu_tanh"


# ---------------------------------------------------------------------------------------------- T2T-ViT
def test_t2t_announces_the_heads_it_assumes_and_takes_them_given_or_shipped(tmp_path, capsys):
    with pytest.warns(AssumedValueWarning, match=r"assumed num_heads=1 .*--arg num_heads="):
        assert load_t2t(T2T).model_args["num_heads"] == 1
    io = load_file(str(REFERENCE / "t2t_vit" / "t2t_vit_transformer_io.safetensors"))
    shipped = json.loads((REFERENCE / "t2t_vit" / "t2t_vit_transformer.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssumedValueWarning)
        given = load_t2t(T2T, num_heads=2).eval()
        beside = load_t2t(_beside(tmp_path, T2T, shipped)).eval()  # constructor_args: num_heads 2, qk_scale None
    assert beside.model_args["num_heads"] == given.model_args["num_heads"] == 2
    with torch.no_grad():
        assert (beside(io["input"]) - io["logits"]).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------- VAR
def test_vqvae_announces_the_code_lookup_and_it_changes_the_codes(tmp_path):
    io = load_file(str(REFERENCE / "var" / "var_io.safetensors"))
    with pytest.warns(AssumedValueWarning) as record:
        assumed = load_var_vqvae(VQVAE, patch_nums=REF_PATCH_NUMS).eval()
    messages = " | ".join(str(w.message) for w in record if issubclass(w.category, AssumedValueWarning))
    assert "assumed using_znorm=False" in messages and "--arg using_znorm=" in messages
    assert "assumed quant_resi=0.5" in messages
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssumedValueWarning)
        cosine = load_var_vqvae(VQVAE, patch_nums=REF_PATCH_NUMS, using_znorm=True, quant_resi=0.5).eval()
        # the reference's constructor arguments beside the weights tell all three, patch_nums included
        shipped = load_var_vqvae(_beside(tmp_path, VQVAE, json.loads((VQVAE.parent / "var.json").read_text())))
    assert list(shipped.model_args["patch_nums"]) == REF_PATCH_NUMS and not shipped.model_args["using_znorm"]
    with torch.no_grad():
        euclid_codes = torch.cat(assumed.img_to_idx(io["img"]), 1)
        cosine_codes = torch.cat(cosine.img_to_idx(io["img"]), 1)
    assert torch.equal(euclid_codes, io["gt_BL"]) and not torch.equal(cosine_codes, io["gt_BL"])


def test_var_announces_heads_and_schedule_it_cannot_read():
    state = load_file(str(VAR))
    bare = {k: v for k, v in state.items() if "scale_mul" not in k and k != "lvl_1L"}
    with pytest.warns(AssumedValueWarning) as record:
        args = infer_var_args(bare, patch_nums=REF_PATCH_NUMS)
    assert args["num_heads"] == args["depth"] and "assumed num_heads=2" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssumedValueWarning)
        assert infer_var_args(state)["num_heads"] == 2  # read off scale_mul_1H11; patch_nums off lvl_1L
        assert infer_var_args(bare, shipped={"num_heads": 4}, patch_nums=REF_PATCH_NUMS)["num_heads"] == 4  # shipped
