"""CLIP with per-tower activation and LayerNorm eps: parity with Hugging Face ``CLIPModel`` whose vision and text
configs differ in ``hidden_act`` and ``layer_norm_eps``, and the defaults that keep one shared pair."""

from __future__ import annotations

import pytest
import torch

import vitkit
from _peers import import_peer
from vitkit.errors import ConfigError
from vitkit.models.clip import CLIP

transformers = import_peer("transformers")  # transformers imports torchvision too
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from vitkit.convert.hf_clip import ARGS, convert_hf_clip, load_hf_clip  # noqa: E402

VOCAB, CONTEXT, SIZE = 40, 10, 16
# name: ((vision hidden_act, eps), (text hidden_act, eps)); the large eps make a tower's own eps visible in 1e-5
TOWERS = {
    "quick_gelu_text": (("gelu", 1e-2), ("quick_gelu", 1e-5)),
    "quick_gelu_vision": (("quick_gelu", 1e-5), ("gelu", 3e-2)),
    "act_only": (("gelu", 1e-5), ("quick_gelu", 1e-5)),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _hf_clip(vision: tuple[str, float], text: tuple[str, float]) -> CLIPModel:
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CONTEXT, hidden_act=text[0],
                         layer_norm_eps=text[1], eos_token_id=VOCAB - 1, bos_token_id=0, pad_token_id=1),
        vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=3,
                           image_size=SIZE, patch_size=4, hidden_act=vision[0], layer_norm_eps=vision[1]),
        projection_dim=12)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial weights; small LayerNorm scales so that the eps matters
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.2)
            if "norm" in name and name.endswith("weight"):
                p.mul_(0.1)
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB - 1, (3, CONTEXT), generator=g)
    ids[:, 0] = 0
    ids[0, 4:] = VOCAB - 1
    ids[1:, -1] = VOCAB - 1
    return torch.randn(3, 3, SIZE, SIZE, generator=g), ids


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(TOWERS))
def test_per_tower_act_and_eps_match_hf(tmp_path, name):
    vision, text = TOWERS[name]
    hf = _hf_clip(vision, text)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_clip(tmp_path / "hf", tmp_path / "ours")
    ours = vitkit.from_pretrained(tmp_path / "ours").eval()
    args = ours.model_args
    assert (args["act"], args["norm_eps"]) == vision
    assert (args.get("text_act") or args["act"], args.get("text_norm_eps") or args["norm_eps"]) == text
    x, ids = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=x)
        out = ours(x, ids)
        assert _max_diff(ref.image_embeds, ours.encode_image(x, normalize=True)) <= 1e-5
        assert _max_diff(ref.text_embeds, ours.encode_text(ids, normalize=True)) <= 1e-5
        assert _max_diff(ref.logits_per_image, out.logits_per_image) <= 1e-5
        # the same weights with one shared act/eps (the vision tower's) give another text embedding
        shared = load_hf_clip(tmp_path / "hf", text_act=vision[0], text_norm_eps=vision[1]).eval()
        assert _max_diff(ref.text_embeds, shared.encode_text(ids, normalize=True)) > 1e-4
        assert _max_diff(ref.image_embeds, shared.encode_image(x, normalize=True)) <= 1e-5


def test_defaults_keep_one_shared_pair():
    kw = dict(embed_dim=8, img_size=8, patch_size=4, vision_width=8, vision_layers=1, vision_heads=2, vocab_size=20,
              context_length=6, text_width=8, text_layers=1, text_heads=2, eos_token_id=19)
    torch.manual_seed(0)
    shared = CLIP(act="gelu", norm_eps=1e-3, **kw)
    torch.manual_seed(0)
    explicit = CLIP(act="relu", norm_eps=1.0, vision_act="gelu", text_act="gelu", vision_norm_eps=1e-3,
                    text_norm_eps=1e-3, **kw)
    for model in (shared, explicit):
        assert {type(m.mlp.act).__name__ for m in [*model.visual.blocks, *model.text.blocks]} == {"GELU"}
        assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-3}
    assert type(CLIP(**kw).text.blocks[0].mlp.act).__name__ == "QuickGELU"  # the default is still OpenAI's
    with pytest.raises(ConfigError, match="text_norm_eps"):
        vitkit.create_model("clip_fmnist_tiny", text_norm_eps=0.0)


def test_hf_clip_args_are_constructor_arguments():
    import inspect

    accepted = set(inspect.signature(CLIP.__init__).parameters)
    assert {a.name for a in ARGS} <= accepted and len({a.name for a in ARGS}) == len(ARGS)
    assert all(a.describe() for a in ARGS)
