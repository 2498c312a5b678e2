"""``vitkit convert open-clip``: parity with OpenCLIP itself (tiny random configs, fp32) on image embeddings, text
embeddings and logits; what is read from the config, what is announced without one, what is refused; and the
tokenizer, which must give OpenCLIP's token ids."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from _peers import import_peer
from vitkit.convert import CONVERTER_ARGS, convert_open_clip, load_open_clip
from vitkit.convert.hf_clip import load_tokenizer
from vitkit.errors import AssumedValueWarning, CheckpointError, ConfigError
from vitkit.layers.clip_bpe import clip_bpe_tokenizer, default_bpe_path
from vitkit.models.clip import CLIP

oc = import_peer("open_clip")
tokenizers = pytest.importorskip("tokenizers")

# name: OpenCLIP model config; every switch the converter reads differs between the two
CONFIGS = {
    # QuickGELU, argmax pooling, square 16x16 images, 3 heads of 8, OpenCLIP's own mlp_ratio
    "quick_gelu_argmax": dict(embed_dim=12, quick_gelu=True,
                              vision_cfg=dict(image_size=16, layers=2, width=24, head_width=8, patch_size=4),
                              text_cfg=dict(context_length=8, vocab_size=40, width=16, heads=2, layers=2)),
    # GELU, 'eos' pooling, 16x24 images, 2 heads of 16, other MLP ratios, a vision LayerNorm eps of its own, the
    # CustomTextCLIP layout (text.*), a shorter context
    "gelu_eos_custom_text": dict(embed_dim=10, custom_text=True,
                                 vision_cfg=dict(image_size=[16, 24], layers=1, width=32, head_width=16, patch_size=8,
                                                 mlp_ratio=2.0, norm_kwargs={"eps": 1e-3}),
                                 text_cfg=dict(context_length=6, vocab_size=30, width=24, heads=3, layers=2,
                                               mlp_ratio=3.0, pool_type="eos", eos_id=29)),
}
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _open_clip(cfg: dict, seed: int = 0):
    """OpenCLIP's model for ``cfg`` (its own class choice: CustomTextCLIP for custom_text), non-trivial weights."""
    torch.manual_seed(seed)
    cfg = dict(cfg)
    cls = oc.model.CustomTextCLIP if cfg.pop("custom_text", False) else oc.model.CLIP
    model = cls(**cfg).eval()
    _perturb(model)
    return model


def _perturb(model) -> None:
    with torch.no_grad():  # OpenCLIP's init has zero biases and unit norms
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _inputs(cfg: dict, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images, and token ids as OpenCLIP's tokenizer lays them out: start, tokens, end of text, zeros."""
    g = torch.Generator().manual_seed(1)
    side = cfg["vision_cfg"]["image_size"]
    h, w = (side, side) if isinstance(side, int) else side
    ctx, vocab = cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]
    ids = torch.randint(1, vocab - 1, (n, ctx), generator=g)
    ids[:, 0] = vocab - 2
    for i, length in enumerate([3, ctx, ctx - 2][:n]):
        ids[i, length - 1] = vocab - 1  # the end of text: the highest id, and the 'eos' id of the second config
        ids[i, length:] = 0
    return torch.randn(n, 3, h, w, generator=g), ids


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _assert_parity(ref, ours: CLIP, x: torch.Tensor, ids: torch.Tensor) -> None:
    with torch.no_grad():
        assert _max_diff(ref.encode_image(x), ours.encode_image(x)) <= 1e-5
        assert _max_diff(ref.encode_text(ids), ours.encode_text(ids)) <= 1e-5
        logits_per_image, logits_per_text = ref.get_logits(x, ids)
        out = ours(x, ids)
        assert _max_diff(logits_per_image, out.logits_per_image) <= 1e-5
        assert _max_diff(logits_per_text, out.logits_per_text) <= 1e-5


def _hub_folder(path, model, cfg: dict, preprocess: dict | None = None):
    """An OpenCLIP hub folder: open_clip_model.safetensors + open_clip_config.json (model_cfg, preprocess_cfg)."""
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess or {}}))
    return path


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_open_clip(tmp_path, name):
    cfg = CONFIGS[name]
    ref = _open_clip(cfg)
    if name == "quick_gelu_argmax":  # a hub folder with its open_clip_config.json
        src = _hub_folder(tmp_path / "hub", ref, cfg, {"mean": MEAN, "std": STD, "interpolation": "bilinear"})
        kwargs = {}
    else:  # a DDP training checkpoint (.pth) and the model config JSON given with --arg config=
        src = tmp_path / "epoch_1.pth"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, src)
        (tmp_path / "model.json").write_text(json.dumps(cfg))
        kwargs = dict(config=str(tmp_path / "model.json"), mean=MEAN, std=STD)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssumedValueWarning)  # the config tells everything: nothing is assumed
        warnings.filterwarnings("ignore", message=".*no tokenizer.json written")
        convert_open_clip(src, tmp_path / "ours", **kwargs)
    ours = vitkit.from_pretrained(tmp_path / "ours").eval()
    args = ours.model_args
    if name == "quick_gelu_argmax":
        assert (args["act"], args["eos_token_id"], args["vision_heads"], ours.img_size) == ("quick_gelu", 2, 3,
                                                                                             (16, 16))
        assert ours.pretrained_cfg["interpolation"] == "bilinear"
    else:
        assert (args["act"], args["eos_token_id"], args["vision_heads"], ours.img_size) == ("gelu", 29, 2, (16, 24))
        assert (args["norm_eps"], args["text_norm_eps"]) == (1e-3, 1e-5)
    assert tuple(ours.pretrained_cfg["mean"]) == tuple(MEAN) and tuple(ours.pretrained_cfg["std"]) == tuple(STD)
    x, ids = _inputs(cfg)
    _assert_parity(ref, ours, x, ids)
    # each switch read from the config matters: the other value gives other outputs
    other = {"quick_gelu_argmax": dict(quick_gelu=False), "gelu_eos_custom_text": dict(norm_eps=1e-5)}[name]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrong = load_open_clip(src, **kwargs, **other).eval()
        assert _max_diff(ref.encode_image(x), wrong.encode_image(x)) > 1e-4


def test_the_factory_model_converts(tmp_path):
    """A model built by open_clip.create_model from a registered config (what OpenCLIP users have)."""
    cfg = CONFIGS["quick_gelu_argmax"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "vitkit-tiny-test.json").write_text(json.dumps(cfg))
    oc.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    ref = oc.create_model("vitkit-tiny-test", pretrained=None).eval()
    _perturb(ref)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_open_clip(tmp_path / "weights.safetensors", config=str(tmp_path / "configs" /
                                                                             "vitkit-tiny-test.json")).eval()
    assumed = [str(w.message).split("assumed ")[1].split("=")[0] for w in caught
               if issubclass(w.category, AssumedValueWarning)]
    assert assumed == ["mean", "std"]  # a model config has no preprocess_cfg; everything else it tells
    _assert_parity(ref, ours, *_inputs(cfg))


def test_without_a_config_everything_else_is_announced_or_required(tmp_path):
    """Bare weights: widths, depths, patch, grid, context and vocabulary come from them; quick_gelu, heads, eps,
    pooling and normalisation are announced (OpenCLIP's defaults), heads that no default gives are required."""
    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=16, layers=1, width=64, patch_size=8),
               text_cfg=dict(context_length=7, vocab_size=50, width=64, heads=1, layers=1))
    ref = _open_clip(cfg)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_open_clip(tmp_path / "bare.safetensors").eval()
    assumed = sorted(str(w.message).split("assumed ")[1].split("=")[0] for w in caught
                     if issubclass(w.category, AssumedValueWarning))
    assert assumed == ["eos_token_id", "mean", "norm_eps", "quick_gelu", "std", "text_heads", "vision_heads"]
    _assert_parity(ref, ours, *_inputs(cfg))

    small = CONFIGS["quick_gelu_argmax"]
    ref = _open_clip(small)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "small.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="pass --arg vision_heads="):
            load_open_clip(tmp_path / "small.safetensors")
        ours = load_open_clip(tmp_path / "small.safetensors", vision_heads=3, text_heads=2, quick_gelu=True).eval()
    _assert_parity(ref, ours, *_inputs(small))


def test_refusals_name_the_config_key(tmp_path):
    cfg = CONFIGS["quick_gelu_argmax"]
    ref = _open_clip(cfg)
    src = _hub_folder(tmp_path / "hub", ref, cfg)

    def with_config(**changes) -> None:
        changed = json.loads(json.dumps(cfg))
        for key, value in changes.items():
            tower, _, item = key.partition("__")
            if item:
                changed[tower][item] = value
            else:
                changed[tower] = value
        (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": changed}))
        load_open_clip(src)

    cases = [(dict(vision_cfg__attentional_pool=True), "vision_cfg.attentional_pool"),
             (dict(vision_cfg__ls_init_value=1e-4), "vision_cfg.ls_init_value"),
             (dict(vision_cfg__pool_type="avg"), "vision_cfg.pool_type"),
             (dict(text_cfg__no_causal_mask=True), "text_cfg.no_causal_mask"),
             (dict(text_cfg__pool_type="last"), "text_cfg.pool_type"),
             (dict(init_logit_bias=-10), "init_logit_bias"),
             (dict(text_cfg__layers=3), "text_cfg.layers gives 3, the weights hold 2"),
             (dict(vision_cfg__image_size=32), "vision_cfg.image_size gives 32: 64 patches, the weights hold 16"),
             (dict(vision_cfg__head_width=7), "head_width=7 does not divide"),
             (dict(text_cfg__heads="two"), "text_cfg.heads='two'")]
    for changes, message in cases:
        with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
            with_config(**changes)
    hf_like = {f"vision_model.{k}": v for k, v in ref.state_dict().items()}
    save_file({k: v.contiguous() for k, v in hf_like.items()}, str(tmp_path / "hf.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="convert hf-clip"):
        load_open_clip(tmp_path / "hf.safetensors", config=str(tmp_path / "model.json"))
    with pytest.raises(ConfigError, match="no such file"):
        load_open_clip(src, config=str(tmp_path / "nothing.json"))
    with pytest.raises(ConfigError, match="quick_gelu"):
        load_open_clip(src, quick_gelu="yes")
    with pytest.raises(CheckpointError, match="holds no OpenCLIP weights"):
        load_open_clip(tmp_path)


# ------------------------------------------------------------------------------------------------ tokenizer
SENTENCES = ["a photo of a cat", "A PHOTO of two Dogs!!", "it's the dog's ball, isn't it?", "café crème brûlée",
             "2024 was 3.14x better", "  spaces   and\ttabs\n", "emoji 🐶 and 日本語 text",
             "hyphen-ated words_with_underscores", "quotes \u2018curly\u2019 \u201cdouble\u201d", "fish &amp; chips",
             "the ﬁrst ﬂoor", "a <end_of_text> inside", "x"]


def test_tokenizer_gives_open_clips_ids():
    bpe = default_bpe_path()
    assert bpe is not None and bpe.name == "bpe_simple_vocab_16e6.txt.gz"
    theirs = oc.tokenizer.SimpleTokenizer(context_length=12)
    ours = clip_bpe_tokenizer(bpe, context_length=12)
    assert ours.get_vocab_size() == theirs.vocab_size == 49408
    long = " ".join(["a photo of a bag"] * 10)  # truncated: the end of text survives in the last position
    texts = [*SENTENCES, long]
    ids = torch.tensor([e.ids for e in ours.encode_batch(texts)])
    assert torch.equal(ids, theirs(texts))
    free = tokenizers.Tokenizer.from_str(ours.to_str())
    free.no_padding()
    free.no_truncation()
    for text in texts:  # untruncated as well
        assert free.encode(text, add_special_tokens=False).ids == theirs.encode(text)
    lower = oc.tokenizer.SimpleTokenizer(context_length=12, clean="whitespace")
    cased = clip_bpe_tokenizer(bpe, context_length=12, lowercase=False)
    assert torch.equal(torch.tensor([e.ids for e in cased.encode_batch(SENTENCES)]), lower(SENTENCES))


def test_converted_folder_carries_the_tokenizer(tmp_path):
    """A model with the real vocabulary (tiny widths): the converted folder's tokenizer.json gives OpenCLIP's ids,
    and the text embeddings of those ids match OpenCLIP's."""
    cfg = dict(embed_dim=8, quick_gelu=True, vision_cfg=dict(image_size=8, layers=1, width=16, head_width=8,
                                                             patch_size=4),
               text_cfg=dict(context_length=20, vocab_size=49408, width=16, heads=2, layers=1))
    ref = _open_clip(cfg)
    src = _hub_folder(tmp_path / "hub", ref, cfg, {"mean": MEAN, "std": STD})
    convert_open_clip(src, tmp_path / "ours")
    tok = load_tokenizer(tmp_path / "ours")
    texts = [*SENTENCES, " ".join(["a photo of a bag"] * 10)]
    ids = torch.tensor([e.ids for e in tok.encode_batch(texts)])
    assert torch.equal(ids, oc.tokenizer.SimpleTokenizer(context_length=20)(texts))
    ours = vitkit.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert _max_diff(ref.encode_text(ids), ours.encode_text(ids)) <= 1e-5
        mask = torch.tensor([e.attention_mask for e in tok.encode_batch(texts)])
        assert _max_diff(ref.encode_text(ids), ours.encode_text(ids, mask)) <= 1e-5
    ours.set_tokenizer(tok)  # the model's pooling rule reads the tokenizer's end of text


def test_cli_and_args(tmp_path):
    from vitkit.cli import main as cli_main

    cfg = CONFIGS["quick_gelu_argmax"]
    src = _hub_folder(tmp_path / "hub", _open_clip(cfg), cfg, {"mean": MEAN, "std": STD})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(["convert", "open-clip", str(src), str(tmp_path / "out"), "--arg", "dynamic_img_size=true"]) \
            == 0
    assert vitkit.from_pretrained(tmp_path / "out").model_args["dynamic_img_size"] is True
    names = {a.name for a in CONVERTER_ARGS["open-clip"]}
    assert {"config", "bpe", "quick_gelu", "vision_heads", "text_heads", "norm_eps", "eos_token_id"} <= names
    assert all(a.describe() for a in CONVERTER_ARGS["open-clip"])
