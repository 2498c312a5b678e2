"""CLIP: parity with Hugging Face ``CLIPModel`` (tiny random configs, fp32), the end-of-text pooling rules, the
contrastive loss over simulated processes, the temperature clamp, checkpoints and the tokenizer hand-over."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.errors import CheckpointError, ConfigError, InputShapeError
from vitkit.layers.text import TextTransformer, text_attention_mask
from vitkit.models.clip import CLIP, LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, clip_loss, eot_index

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from vitkit.convert.hf_clip import convert_hf_clip, load_hf_clip, load_tokenizer  # noqa: E402

VOCAB, CONTEXT = 50, 12
# name: (CLIPConfig keyword changes, image size); projection widths differ from both tower widths throughout
CONFIGS = {
    # OpenAI's activation, the current eos convention (first position of eos_token_id), 24x24 images
    "quick_gelu": (dict(act="quick_gelu", eos=3, proj=20, patch=4), 24),
    # GELU (most non-OpenAI checkpoints), the legacy eos_token_id=2 (pool at the highest id), 32x32 images
    "gelu_legacy_eos": (dict(act="gelu", eos=2, proj=16, patch=8), 32),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _hf_clip(act: str = "quick_gelu", eos: int = VOCAB - 1, proj: int = 20, patch: int = 4, image_size: int = 24,
             vocab: int = VOCAB, bos: int = 0, pad: int = 1) -> CLIPModel:
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT, hidden_act=act, eos_token_id=eos,
                         bos_token_id=bos, pad_token_id=pad),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                           image_size=image_size, patch_size=patch, hidden_act=act),
        projection_dim=proj)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial weights: HF's init has zero biases and unit norms
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _texts(eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three captions: right-padded, full length, left-padded (only there does the mask change real tokens).

    With the legacy ``eos=2`` the end-of-text token is ``VOCAB - 1``, the highest id, as in OpenAI's tokenizer;
    otherwise it is ``eos`` itself, a low id that only the first-position rule finds. Right padding repeats the
    end-of-text token (what OpenAI's tokenizer does on the Hub), so the first occurrence must be taken. Legacy
    captions also hold an ordinary token 2, which the legacy rule must not mistake for their end."""
    g = torch.Generator().manual_seed(1)
    end = VOCAB - 1 if eos == 2 else eos
    ids = torch.randint(4, VOCAB - 1, (3, CONTEXT), generator=g)
    ids[:, 0] = 0  # start of text
    if eos == 2:
        ids[:, 2] = 2
    ids[0, 5:] = end
    ids[1, -1] = end
    ids[2, :4], ids[2, 4], ids[2, -1] = 1, 0, end
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, :4] = 0
    return ids, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_hf_clip(tmp_path, name):
    kw, size = CONFIGS[name]
    hf = _hf_clip(image_size=size, **kw)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_clip(tmp_path / "hf").eval()
    assert ours.model_args["eos_token_id"] == kw["eos"] and ours.model_args["act"] == kw["act"]
    assert (ours.embed_dim, ours.img_size, ours.context_length) == (kw["proj"], (size, size), CONTEXT)
    x = torch.randn(3, 3, size, size)
    ids, mask = _texts(kw["eos"])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=x, attention_mask=mask, return_loss=True)
        image = hf.get_image_features(pixel_values=x).pooler_output
        text = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        out = ours(x, ids, mask)
        assert _max_diff(image, ours.encode_image(x)) <= 1e-5
        assert _max_diff(text, ours.encode_text(ids, mask)) <= 1e-5
        assert _max_diff(ref.image_embeds, ours.encode_image(x, normalize=True)) <= 1e-5
        assert _max_diff(ref.text_embeds, ours.encode_text(ids, mask, normalize=True)) <= 1e-5
        assert _max_diff(ref.logits_per_image, out.logits_per_image) <= 1e-5
        assert _max_diff(ref.logits_per_text, out.logits_per_text) <= 1e-5
        assert _max_diff(ref.loss, out.loss) <= 1e-5
        assert _max_diff(ref.loss, clip_loss(ours.encode_image(x), ours.encode_text(ids, mask), ours.logit_scale)) \
            <= 1e-5
        # the mask matters for the left-padded caption (and only there: padding on the right is causally unseen)
        unmasked = ours.encode_text(ids)
        assert _max_diff(unmasked[:2], text[:2]) <= 1e-5 and _max_diff(unmasked[2], text[2]) > 1e-3


def test_interpolated_positions_and_round_trip(tmp_path):
    """The converted folder rebuilds through from_pretrained; at other sizes it matches interpolate_pos_encoding."""
    hf = _hf_clip()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text('{"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]}')
    convert_hf_clip(tmp_path / "hf", tmp_path / "ours")
    ours = vitkit.from_pretrained(tmp_path / "ours", dynamic_img_size=True).eval()
    assert isinstance(ours, CLIP) and not (tmp_path / "ours" / "tokenizer.json").exists()
    assert tuple(ours.pretrained_cfg["mean"]) == (0.1, 0.2, 0.3) and tuple(ours.pretrained_cfg["std"]) == (1, 2, 3)
    for size in [(24, 24), (32, 32), (16, 24)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = hf.get_image_features(pixel_values=x, interpolate_pos_encoding=True).pooler_output
            assert _max_diff(ref, ours.encode_image(x)) <= 1e-5


# ------------------------------------------------------------------------------------------------ pooling
def test_eot_index_follows_both_hf_conventions():
    ids = torch.tensor([[0, 7, 9, 5, 9, 1],   # 9 twice
                        [0, 4, 3, 8, 8, 8],   # padded with the eos id itself
                        [0, 4, 3, 6, 1, 1]])  # no 8 at all
    # legacy eos_token_id=2: the (first) highest id, whatever it is
    assert eot_index(ids, 2).tolist() == [2, 3, 3]
    # otherwise: the first position of eos_token_id; a sequence without it is read at position 0, as in HF
    assert eot_index(ids, 8).tolist() == [0, 3, 0]
    assert eot_index(ids, 9).tolist() == [2, 0, 0]


def test_text_is_read_at_the_end_of_text_token():
    torch.manual_seed(0)
    model = CLIP(embed_dim=8, img_size=8, patch_size=4, vision_width=8, vision_layers=1, vision_heads=2,
                 vocab_size=20, context_length=6, text_width=8, text_layers=2, text_heads=2, eos_token_id=19).eval()
    ids = torch.tensor([[0, 5, 6, 19, 3, 4]])
    changed = ids.clone()
    changed[0, 4:] = torch.tensor([7, 8])  # after the end of text: causally invisible
    earlier = ids.clone()
    earlier[0, 1] = 9
    with torch.no_grad():
        base = model.encode_text(ids)
        assert torch.equal(base, model.encode_text(changed))
        assert _max_diff(base, model.encode_text(earlier)) > 1e-4


def test_text_transformer_masks():
    """Causal: a token never sees later ones; bidirectional + padding: padded tokens are invisible to real ones;
    a fully padded query row stays finite (it sees itself)."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    other = ids.clone()
    other[0, 4:] = torch.tensor([11, 12])
    for causal in (True, False):
        enc = TextTransformer(vocab_size=16, context_length=6, width=8, depth=2, num_heads=2, causal=causal).eval()
        with torch.no_grad():
            a, b = enc(ids, mask), enc(other, mask)
        assert torch.isfinite(a).all()
        assert _max_diff(a[:, :4], b[:, :4]) <= 1e-6
    left = text_attention_mask(torch.tensor([[0, 0, 1]]), 3, causal=True)
    assert left[0, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert text_attention_mask(None, 3, causal=False) is None


# ------------------------------------------------------------------------------------------------ the loss
def _simulated_all_gather(rank: int, world: int, fulls: list[torch.Tensor], other_grad: bool = True):
    """``all_gather`` of process ``rank`` out of ``world``, simulated in one process.

    ``fulls`` are the global batches of the tensors the loss will gather (their parts are the processes'
    inputs); the loss gathers them L2-normalised, so the fake normalises them too and recognises which one it
    is given. The local part is the tensor itself (its gradient flows to this process's inputs). The other
    processes' parts come from the same global leaves with their gradient (``other_grad``): that is what
    ``all_gather_with_grad``'s backward does with its all_reduce (every process's loss sends gradient to every
    part, each process keeps the sum for its own). ``other_grad=False`` is a plain all_gather.
    """
    normed = [F.normalize(f.float(), dim=-1) for f in fulls]

    def gather(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0]
        for full in normed:
            if torch.allclose(full[rank * n:(rank + 1) * n], t, atol=1e-7):
                parts = [full[q * n:(q + 1) * n] if other_grad else full[q * n:(q + 1) * n].detach()
                         for q in range(world)]
                parts[rank] = t
                return torch.cat(parts)
        raise AssertionError("all_gather got a tensor that is none of the gathered features")

    return gather


def test_distributed_clip_loss_equals_the_global_batch():
    """Two simulated processes, each with half the batch and negatives from both, give the loss and the
    gradients of the whole batch: the mean of the two losses (what DDP's gradient averaging differentiates)."""
    world, n, dim = 2, 4, 6
    g = torch.Generator().manual_seed(0)
    images = torch.randn(world * n, dim, generator=g).requires_grad_()
    texts = (images.detach() + torch.randn(world * n, dim, generator=g)).requires_grad_()
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    ref = clip_loss(images, texts, scale)
    ref_grads = torch.autograd.grad(ref, (images, texts, scale))

    def simulate(other_grad: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        losses = []
        for rank in range(world):
            part = slice(rank * n, (rank + 1) * n)
            gather = _simulated_all_gather(rank, world, [images, texts], other_grad)
            losses.append(clip_loss(images[part], texts[part], scale, gather, rank=rank, world_size=world))
        mean = torch.stack(losses).mean()
        return mean, torch.autograd.grad(mean, (images, texts, scale))

    loss, grads = simulate(other_grad=True)
    assert abs(loss.item() - ref.item()) <= 1e-6
    for got, want in zip(grads, ref_grads):
        assert _max_diff(got, want) <= 1e-6
    # without the gradient of the gathered parts the loss is the same, the feature gradients are not
    plain_loss, plain = simulate(other_grad=False)
    assert abs(plain_loss.item() - ref.item()) <= 1e-6
    assert _max_diff(plain[0], ref_grads[0]) > 1e-3
    with pytest.raises(ValueError, match="world_size"):
        clip_loss(images[:n], texts[:n], scale, lambda t: t, rank=0, world_size=2)


def test_logit_scale_init_and_clamp():
    torch.manual_seed(0)
    model = vitkit.create_model("clip_fmnist_tiny", vision_layers=1, text_layers=1).eval()
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT) == pytest.approx(math.log(1 / 0.07))
    x = torch.randn(2, 1, 28, 28)
    ids = torch.tensor([[0, 5, 999, 1], [0, 7, 8, 999]])
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        cos = model.encode_image(x, normalize=True) @ model.encode_text(ids, normalize=True).T
        out = model(x, ids)
    assert _max_diff(out.logits_per_image, 100 * cos) <= 1e-4  # exp(ln 100), not exp(10)
    assert torch.equal(out.logits_per_text, out.logits_per_image.T)
    model(x, ids).loss.backward()
    assert model.logit_scale.grad.item() == 0.0  # above the clamp the temperature no longer moves
    scale = torch.tensor(LOGIT_SCALE_MAX - 1, requires_grad=True)
    clip_loss(torch.randn(3, 4), torch.randn(3, 4), scale).backward()
    assert scale.grad.item() != 0.0


# ------------------------------------------------------------------------------------------------ models
def test_registry_round_trip_and_errors(tmp_path):
    assert {"clip_vit_b32", "clip_vit_b16", "clip_vit_l14", "clip_fmnist_tiny"} <= set(vitkit.list_models("clip_*"))
    torch.manual_seed(0)
    model = vitkit.create_model("clip_fmnist_tiny").eval()
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    x = torch.randn(3, 1, 28, 28)
    ids = torch.randint(0, 999, (3, 32))
    ids[:, -1] = 999
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    with torch.no_grad():
        expected = model(x, ids, mask)
    assert expected.logits_per_image.shape == (3, 3)
    model.save_pretrained(tmp_path / "ckpt")
    for loaded in (vitkit.from_pretrained(tmp_path / "ckpt"),
                   vitkit.create_model("clip_fmnist_tiny", pretrained=tmp_path / "ckpt")):
        assert type(loaded) is CLIP and loaded.model_name == "clip_fmnist_tiny"
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x, ids, mask).logits_per_image, expected.logits_per_image)
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    model.train()
    model(x, ids, mask).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    with pytest.raises(InputShapeError, match="context of 32 tokens"):
        model.encode_text(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(InputShapeError, match="integer token ids"):
        model.encode_text(torch.zeros(1, 4))
    with pytest.raises(ConfigError, match="eos_token_id"):
        vitkit.create_model("clip_fmnist_tiny", vocab_size=500)  # its end-of-text id 999 would not exist


# ------------------------------------------------------------------------------------------------ converter
def _train_tokenizer():
    """A tiny BPE trained here. Its end-of-text token gets id 1: not 2, which HF reads as the legacy convention."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|pad|>", "<|endoftext|>", "<|startoftext|>"]
    sentences = ["a photo of a sneaker", "a photo of a bag", "a drawing of a coat", "an ankle boot on grass",
                 "a shirt and a dress", "trousers folded on a chair"] * 4
    tok.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=60, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", tok.token_to_id("<|startoftext|>")),
                        ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    tok.enable_padding(pad_id=0, pad_token="<|pad|>")
    return tok


def test_tokenizer_travels_with_the_converted_model(tmp_path):
    tok = _train_tokenizer()
    eos, bos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|startoftext|>")
    assert eos == 1
    hf = _hf_clip(vocab=tok.get_vocab_size(), eos=eos, bos=bos, pad=0)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    convert_hf_clip(tmp_path / "hf", tmp_path / "ours")
    loaded = load_tokenizer(tmp_path / "ours")
    assert isinstance(loaded, tokenizers.Tokenizer)
    assert loaded.truncation["max_length"] == CONTEXT  # the model's context, from its config.json
    long = " ".join(["a photo of a bag"] * 10)
    batch = loaded.encode_batch(["a photo of a sneaker", "a coat", long])
    ids = torch.tensor([e.ids for e in batch])
    mask = torch.tensor([e.attention_mask for e in batch])
    assert ids.shape == (3, CONTEXT) and ids[2, -1] == eos  # truncation keeps the end-of-text token
    assert ids[1].tolist().index(eos) == int(mask[1].sum()) - 1  # right after the caption, then padding
    ours = vitkit.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        assert _max_diff(ref, ours.encode_text(ids, mask)) <= 1e-5
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_converter_errors_name_the_problem(tmp_path):
    hf = _hf_clip()
    hf.save_pretrained(tmp_path / "hf")
    # an old-style folder: config.json + pytorch_model.bin of the in-memory state dict (read with weights_only)
    (tmp_path / "bin").mkdir()
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ids, _ = _texts(VOCAB - 1)
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=ids).pooler_output
        assert _max_diff(ref, load_hf_clip(tmp_path / "bin").eval().encode_text(ids)) <= 1e-5
    cfg = (tmp_path / "hf" / "config.json").read_text()
    (tmp_path / "hf" / "config.json").write_text(cfg.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3', 1))
    with pytest.raises(CheckpointError, match="has 3 layers, the weights hold 2"):
        load_hf_clip(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "siglip"}')
    with pytest.raises(CheckpointError, match="model_type is 'siglip'"):
        load_hf_clip(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_hf_clip(tmp_path / "nothing")
