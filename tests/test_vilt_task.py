"""The ViLT pretraining task (tasks/vilt.py): whole-word masking, ITM negatives, WPA, tokenizer storage, training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_data import data_no_system_dirs, write_fake_fmnist  # noqa: F401  (fixture)
from vitkit.data import batch_collate
from vitkit.data.captions import CaptionDataset, compose_captioned, swapped_caption, train_tokenizer
from vitkit.errors import ConfigError
from vitkit.tasks.base import TaskContext, parse_task_args
from vitkit.tasks.vilt import (
    ViLTArgs,
    ViLTTask,
    draw_itm_pairs,
    encode_captions,
    may_match,
    whole_word_mask,
)

TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=7, max_text_len=20)
SPECIAL_IDS = range(5)  # [PAD] [UNK] [CLS] [SEP] [MASK]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models gain nothing from more threads; one keeps the tests steady on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dataset(n: int = 64, seed: int = 0) -> CaptionDataset:
    rng = np.random.default_rng(seed)
    images = np.zeros((40, 28, 28), np.uint8)
    images[:, 4:24, 6:22] = rng.integers(100, 256, (40, 20, 16), dtype=np.uint8)
    canvases, captions, halves, _ = compose_captioned(images, np.arange(40) % 10, n, seed=seed)
    return CaptionDataset(torch.from_numpy(canvases)[:, None], captions, torch.from_numpy(halves))


def _task(ds: CaptionDataset, **args) -> tuple[ViLTTask, torch.nn.Module]:
    ctx = TaskContext(train_set=ds, eval_set=ds, eval_batch_size=32, collate=batch_collate)
    task = ViLTTask(ViLTArgs(iteration=10, retrieval_images=16, retrieval_candidates=5, **args), ctx)
    model = task.build_model(SimpleNamespace(name="vilt_fmnist_tiny", pretrained=None, args=dict(TINY)))
    task.setup(model)
    return task, model


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_deterministic_and_keeps_words_whole():
    captions = _dataset(300).captions
    tok = train_tokenizer(captions, 128)
    code = ("import sys, json; from vitkit.data.captions import train_tokenizer; "
            "print(train_tokenizer(json.loads(sys.stdin.read()), 128).to_str())")
    other = subprocess.run([sys.executable, "-c", code], input=json.dumps(captions), capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True).stdout.strip()
    assert other == tok.to_str()  # another process (DDP rank, a resumed run) gets the same ids
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == list(SPECIAL_IDS)
    enc = encode_captions(tok, ["a dark t-shirt on the left", "a bag"], 20)
    assert enc.input_ids[0, 0] == 2 and enc.input_ids[1, 3] == 3  # [CLS] ... [SEP], padded with 0
    assert enc.attention_mask[1].tolist() == [1, 1, 1, 1] + [0] * (enc.input_ids.shape[1] - 4)
    pieces = tok.encode("a dark t-shirt on the left").tokens
    assert pieces[3:6] == ["t", "-", "shirt"]
    assert enc.word_ids[0].tolist() == [-1, 0, 1, 2, 2, 2, 3, 4, 5, -1]  # "t-shirt" is one word
    # truncation keeps [SEP]
    short = encode_captions(tok, ["a small dark t-shirt to the right of a small dark t-shirt"], 8)
    assert short.input_ids.shape == (1, 8) and short.input_ids[0, -1] == 3


# ---------------------------------------------------------------------------- whole-word masking
def test_whole_word_masking_masks_every_piece_of_about_15_percent_of_words():
    captions = _dataset(2000, seed=1).captions
    tok = train_tokenizer(captions, 50)  # a small vocabulary: most words are spelt in ## pieces
    assert any(t.startswith("##") for t in tok.encode(captions[0]).tokens)
    enc = encode_captions(tok, captions, 64)
    random_ids = torch.arange(5, tok.get_vocab_size())
    g = torch.Generator().manual_seed(0)
    masked, labels = whole_word_mask(enc.input_ids, enc.word_ids, 0.15, 4, random_ids, g)
    again = whole_word_mask(enc.input_ids, enc.word_ids, 0.15, 4, random_ids, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again[0]) and torch.equal(labels, again[1])  # seeded
    chosen = labels != -100
    assert not chosen[enc.word_ids < 0].any()  # never [CLS], [SEP] or padding
    assert not torch.isin(labels[chosen], torch.tensor(list(SPECIAL_IDS))).any()
    assert torch.equal(labels[chosen], enc.input_ids[chosen])
    n_words = enc.word_ids.max(1).values + 1
    masked_words = torch.zeros_like(n_words)
    for b in range(len(captions)):
        for w in range(int(n_words[b])):
            tokens = chosen[b][enc.word_ids[b] == w]
            assert tokens.all() or not tokens.any(), "a word is masked whole or not at all"
            masked_words[b] += int(tokens.all())
    # per caption floor or ceil of 15% of its words, at least one; 15% on average over long captions
    lo = torch.floor(0.15 * n_words).clamp(min=1)
    hi = torch.ceil(0.15 * n_words).clamp(min=1)
    assert ((masked_words >= lo) & (masked_words <= hi)).all()
    long = n_words >= 7
    share = masked_words[long].sum() / n_words[long].sum()
    assert 0.14 < share < 0.16


def test_masked_tokens_follow_80_10_10():
    n, t = 4000, 20
    ids = torch.randint(5, 100, (n, t))
    word_ids = torch.arange(t).expand(n, t).clone()  # one token per word
    random_ids = torch.arange(5, 100)
    masked, labels = whole_word_mask(ids, word_ids, 0.5, 4, random_ids, torch.Generator().manual_seed(1))
    chosen = labels != -100
    m = chosen.sum().item()
    as_mask = (masked[chosen] == 4).float().sum().item() / m
    kept = (masked[chosen] == ids[chosen]).float().sum().item() / m
    other = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.01
    assert abs(other - 0.1 * (1 - 1 / 95)) < 0.01  # a random token equal to the original counts as kept
    assert abs(kept - (0.1 + 0.1 / 95)) < 0.01
    assert not torch.isin(masked[chosen & (masked != 4)], torch.tensor(list(SPECIAL_IDS))).any()
    assert torch.equal(masked[~chosen], ids[~chosen])


# ---------------------------------------------------------------------------- ITM negatives
def test_swapped_images_are_exactly_the_negatives():
    ds = _dataset(64)
    task, _ = _task(ds)
    raw = ds.__getitems__(list(range(32)))
    clean = task.prepare_batch(raw, train=False)["images"]
    torch.manual_seed(3)
    batch = task.prepare_batch(raw, train=True)
    labels, partner = batch["itm_labels"], batch["partner"]
    assert labels.sum() == 16  # exactly half, as the official code
    rows = torch.arange(32)
    assert torch.equal(partner == rows, labels == 1)
    assert torch.equal(batch["images"], clean[partner])  # negatives carry another sample's image, positives their own
    neg = labels == 0
    assert not may_match(raw["labels"], raw["labels"])[rows[neg], partner[neg]].any()  # never a chance match
    assert torch.equal(batch["mlm_images"], clean)  # MLM rows: every caption with its own image
    # the ITM text is the clean caption (no hard negatives by default); the MLM copy is masked
    plain = task.encode(raw["captions"])
    assert torch.equal(batch["input_ids"], plain.input_ids)
    assert (batch["mlm_labels"] != -100).any()


def test_hard_negatives_and_joint_pass():
    ds = _dataset(64)
    raw = ds.__getitems__(list(range(32)))
    two_item = torch.tensor([swapped_caption(c) is not None for c in raw["captions"]])
    task, _ = _task(ds, hard_negative_prob=1.0)
    clean = task.prepare_batch(raw, train=False)["images"]
    torch.manual_seed(0)
    batch = task.prepare_batch(raw, train=True)
    hard, labels = batch["hard"], batch["itm_labels"]
    assert torch.equal(hard, (labels == 0) & two_item)  # every negative that can be a hard one is
    assert hard.any() and (labels == 0).sum() == 16
    for i in range(32):
        if hard[i]:  # own image, position-swapped words
            assert torch.equal(batch["images"][i], clean[i])
            want = task.encode([swapped_caption(raw["captions"][i])]).input_ids[0]
            assert torch.equal(batch["input_ids"][i][:len(want)], want)
    assert torch.equal(batch["mlm_images"], clean)  # the MLM rows keep the true captions and images
    assert torch.equal(batch["mlm_labels"][batch["mlm_labels"] != -100],
                       task.encode(raw["captions"]).input_ids[batch["mlm_labels"] != -100])

    joint, _ = _task(ds, joint_pass=True)
    torch.manual_seed(0)
    batch = joint.prepare_batch(raw, train=True)
    assert batch["mlm_input_ids"] is None  # the ITM rows carry the masked text
    plain = joint.encode(raw["captions"]).input_ids
    targets = batch["mlm_labels"] != -100
    assert ((batch["input_ids"] != plain).any(1) <= targets.any(1) | (batch["itm_labels"] == 0)).all()
    assert (targets.any(1) <= (batch["itm_labels"] == 1)).all()  # MLM targets on matching rows only
    assert targets.any()


def test_draw_itm_pairs_edge_cases():
    matching, partner = draw_itm_pairs(1, 0.5)
    assert matching.all() and partner.tolist() == [0]
    labels = torch.tensor([[1, -1], [1, 2], [3, -1]])
    # caption 0 ("1 on the left") may describe image 1 (1 left, 2 right): its only sure negative is image 2
    assert may_match(labels, labels).tolist() == [[True, True, False], [False, True, False], [False, False, True]]
    for seed in range(20):
        m, p = draw_itm_pairs(3, 0.67, labels, torch.Generator().manual_seed(seed))
        assert (~m).sum() == 2
        for i in torch.nonzero(~m)[:, 0].tolist():
            assert p[i] != i and not may_match(labels[i:i + 1], labels[p[i]:p[i] + 1]).item()


# ---------------------------------------------------------------------------- WPA
def test_wpa_pulls_matching_pairs_and_pushes_negatives():
    ds = _dataset(16)
    task, model = _task(ds)
    batch = task.prepare_batch(ds.__getitems__(list(range(8))), train=False)
    enc = task.encode(batch["captions"])
    with torch.no_grad():
        out = model(enc.input_ids, enc.attention_mask, None, batch["images"])
    feats = {k: out[k].clone() for k in ("text_feats", "image_feats", "text_masks", "image_masks")}
    feats["text_feats"].requires_grad_(True)
    feats["image_feats"].requires_grad_(True)
    pos = torch.tensor([True] * 4 + [False] * 4)
    dist = task.wpa_distance(feats).detach()
    assert torch.isfinite(dist).all() and (dist > 0).all()
    loss = task.wpa_loss(feats, pos, ~pos)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, (dist[:4].sum() - dist[4:].sum()) / 8)
    everyone = torch.ones_like(pos)
    assert torch.allclose(task.wpa_loss(feats, everyone, ~everyone), dist.mean())  # all matching: +mean
    loss.backward()
    stepped = {**feats, "text_feats": feats["text_feats"] - 0.5 * feats["text_feats"].grad,
               "image_feats": feats["image_feats"] - 0.5 * feats["image_feats"].grad}
    after = task.wpa_distance({k: v.detach() for k, v in stepped.items()})
    assert (after[:4] < dist[:4]).all()  # a descent step brings matching words and patches together
    assert (after[4:] > dist[4:]).all()  # and pushes non-matching ones apart


# ---------------------------------------------------------------------------- training and evaluation
def test_training_steps_decrease_the_loss_and_stats_are_sums():
    ds = _dataset(32)
    task, model = _task(ds, hard_negative_prob=0.5)
    raw = ds.__getitems__(list(range(32)))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses, itm = [], []
    model.train()
    for _ in range(12):
        torch.manual_seed(0)  # the same negatives and masks every step: the loss of one fixed batch
        batch = task.prepare_batch(raw, train=True)
        loss, stats = task.training_step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        itm.append(stats["itm_loss"] / 32)
        assert stats["count"] == 32 and 0 <= stats["itm_acc"] <= 32
        assert abs(stats["loss"] - loss.item() * 32) < 1e-3
        for key in ("itm_loss", "mlm_loss", "wpa_loss"):
            assert np.isfinite(stats[key])
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.85 * losses[0] and itm[-1] < itm[0], (losses, itm)


def test_evaluate_is_seeded_and_in_range():
    ds = _dataset(48)
    task, model = _task(ds)
    model.eval()

    def batches():
        return (task.prepare_batch(ds.__getitems__(list(range(i, min(i + 20, 48)))), train=False)
                for i in range(0, 48, 20))

    metrics = task.evaluate(model, batches())
    assert metrics == task.evaluate(model, batches())  # the same pairs, masks and candidates every time
    for key in ("itm_acc", "mlm_acc", "hard_neg_acc", "retrieval_r1", "retrieval_r5"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["count"] == 48 and metrics["retrieval_count"] == 16
    assert metrics["hard_neg_count"] == sum(swapped_caption(c) is not None for c in ds.captions)
    assert metrics["wpa_pos"] > 0 and metrics["wpa_neg"] > 0 and metrics["itm_loss"] > 0
    assert "ITM accuracy" in task.format_report(metrics)


def test_predict_ranks_captions_and_needs_them():
    ds = _dataset(8)
    task, model = _task(ds)
    images = task.prepare_batch(ds.__getitems__([0, 1]), train=False)["images"]
    with pytest.raises(ConfigError, match="captions"):
        task.predict(model.eval(), images)
    out = task.predict(model, images, captions=[ds.captions[0], ds.captions[1], "a bag on the left"], topk=2)
    assert len(out) == 2 and all(len(r["captions"]) == 2 for r in out)
    scores = [c["score"] for c in out[0]["captions"]]
    assert scores == sorted(scores, reverse=True) and 0 < out[0]["captions"][0]["prob"] < 1
    per_image = task.predict(model, images, captions=[["a bag on the left"], [ds.captions[1], "a coat on the right"]])
    assert [len(r["captions"]) for r in per_image] == [1, 2]


def test_retrieval_scores_are_itm_logits_of_every_pair(tmp_path):
    from PIL import Image

    from vitkit.tools.predict import retrieval_scores, retrieve_files

    ds = _dataset(8)
    task, model = _task(ds)
    model.save_pretrained(tmp_path / "ckpt")
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"c{i}.png"))
        Image.fromarray(ds.images[i, 0].numpy()).save(paths[-1])
    texts = [ds.captions[0], ds.captions[1], "a bag on the left"]
    scores = retrieval_scores(tmp_path / "ckpt", paths, texts)
    images = task.prepare_batch(ds.__getitems__([0, 1]), train=False)["images"]
    with torch.no_grad():
        ref = torch.stack([task._scores(model.eval(), images[i:i + 1].expand(3, -1, -1, -1), texts) for i in range(2)])
    assert scores.shape == (2, 3) and torch.allclose(scores, ref, atol=1e-4)
    best = retrieve_files(tmp_path / "ckpt", paths, texts, to_text=True, topk=1)
    assert [r["matches"][0][0] for r in best] == [texts[int(i)] for i in ref.argmax(1)]


def test_args_and_augmentation_checks():
    assert parse_task_args(ViLTTask, {"wpa_weight": 0.1, "hard_negative_prob": 0.25}).wpa_weight == 0.1
    with pytest.raises(ConfigError, match="mlm_prob"):
        ViLTArgs(mlm_prob=0)
    with pytest.raises(ConfigError, match="nope"):
        parse_task_args(ViLTTask, {"nope": 1})
    from vitkit.data.transforms import AugmentConfig

    with pytest.raises(ConfigError, match="hflip"):
        ViLTTask(ViLTArgs(), TaskContext(augment=AugmentConfig(hflip=True)))


def test_recipe_parses():
    from vitkit.engine import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "captions" / "vilt_tiny.yaml")
    assert cfg.task.name == "vilt" and cfg.model.name == "vilt_fmnist_tiny" and cfg.data.name == "fmnist_captions"
    assert parse_task_args(ViLTTask, cfg.task.args).wpa_weight == 0.1


# ---------------------------------------------------------------------------- tokenizer storage, end to end
def test_tokenizer_travels_with_the_weights(tmp_path):
    from vitkit.models import from_pretrained

    ds = _dataset(32)
    task, model = _task(ds)
    text = model.tokenizer.to_str()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert json.dumps(saved["model_args"]["tokenizer"]) == json.dumps(json.loads(text))  # with the weights
    loaded = from_pretrained(tmp_path / "ckpt")
    assert loaded.tokenizer.to_str() == text
    fresh = ViLTTask(ViLTArgs())
    fresh.setup(loaded)
    assert torch.equal(fresh.encode(ds.captions).input_ids, task.encode(ds.captions).input_ids)
    # fine-tuning from the checkpoint keeps its tokenizer, whatever the new captions are
    other = ViLTTask(ViLTArgs(), TaskContext(train_set=_dataset(32, seed=5)))
    again = other.build_model(SimpleNamespace(name="vilt_fmnist_tiny", pretrained=str(tmp_path / "ckpt"),
                                              args=dict(TINY)))
    assert again.tokenizer.to_str() == text
    # a model without one is refused with a clear message; one too large for the embedding table too
    from vitkit.models import create_model

    with pytest.raises(ConfigError, match="carries no tokenizer"):
        ViLTTask(ViLTArgs()).setup(create_model("vilt_fmnist_tiny", **TINY))
    with pytest.raises(ConfigError, match="vocab_size"):
        ViLTTask(ViLTArgs(vocab_size=200), TaskContext(train_set=ds)).build_model(
            SimpleNamespace(name="vilt_fmnist_tiny", pretrained=None, args={**TINY, "vocab_size": 64}))


def test_train_one_epoch_end_to_end(tmp_path, data_no_system_dirs):  # noqa: F811
    from vitkit.engine import train

    write_fake_fmnist(tmp_path / "fm", n_train=20, n_test=10)
    over = ["task.name=vilt", "model.name=vilt_fmnist_tiny", *(f"model.args.{k}={v}" for k, v in TINY.items()),
            "data.name=fmnist_captions", f"data.data_dir={tmp_path / 'fm'}", "data.download=false",
            "data.args.num=48", "train.batch_size=16", "train.epochs=1", "train.eval_batch_size=32",
            "train.progress=false", "train.threads=1", "train.bf16=false", "task.args.iteration=5",
            "task.args.retrieval_images=8", "task.args.retrieval_candidates=5", f"output_dir={tmp_path / 'run'}"]
    summary = train(None, over)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["primary_metric"] == "itm_acc" and written["task"] == "vilt"
    assert 0 <= written["best"]["itm_acc"] <= 1 and summary["steps"] == 3
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("train_itm_acc", "train_mlm_loss", "train_wpa_loss", "eval_mlm_acc", "eval_retrieval_r1"):
        assert key in record, key
    for name in ("best", "last"):
        cfg = json.loads((tmp_path / "run" / "checkpoints" / name / "config.json").read_text())
        assert cfg["model_args"]["tokenizer"] and cfg["pretrained_cfg"]["task"] == "vilt"
    # vitkit eval: the checkpoint's own task, settings and tokenizer
    from vitkit.tools.evaluate import evaluate_checkpoint, load_model

    metrics, task = evaluate_checkpoint(tmp_path / "run", data="fmnist_captions", data_dir=str(tmp_path / "fm"),
                                        num=48, batch_size=32)
    assert task.name == "vilt" and metrics["itm_acc"] == written["final"]["itm_acc"]  # the same seeded pairs
    assert "MLM accuracy" in task.format_report(metrics)
    model = load_model(tmp_path / "run")
    task.setup(model)
    images = task.prepare_batch(torch.zeros(1, 1, 28, 56, dtype=torch.uint8), train=False)
    assert task.predict(model, images, captions=["a bag on the left"])[0]["best"] == "a bag on the left"
