"""The clip task (tasks/clip.py): the caption tokenizer carried by the model and its end-of-text agreement, the
training step (alone and over simulated processes), evaluation on hand-checkable cases and over two simulated
processes, zero-shot classification (library and ``vitkit zeroshot``), and a whole training run."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from test_data import data_no_system_dirs, write_fake_fmnist  # noqa: F401  (fixture)

pytest.importorskip("tokenizers")

import vitkit  # noqa: E402
from vitkit.data.captions import CaptionDataset, caption_collate, compose_captioned, swapped_caption  # noqa: E402
from vitkit.data.constants import FMNIST_CLASSES  # noqa: E402
from vitkit.data.transforms import AugmentConfig  # noqa: E402
from vitkit.engine.config import ModelConfig  # noqa: E402
from vitkit.errors import ConfigError  # noqa: E402
from vitkit.models.clip import CLIP, LOGIT_SCALE_INIT, clip_loss, eot_index  # noqa: E402
from vitkit.tasks import TaskContext, build_task  # noqa: E402
from vitkit.tasks.clip import (  # noqa: E402
    CLIPArgs,
    CLIPTask,
    caption_tokenizer,
    checkpoint_tokenizer,
    class_embeddings,
    configured_tokenizer,
    tokenize,
    zero_shot_classify,
)

TINY = dict(embed_dim=16, vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
            text_heads=2, mlp_ratio=2.0)
WORDS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; also undoes train.threads=1


def _captioned(n: int, seed: int = 0) -> CaptionDataset:
    """``n`` captioned canvases of random 28x28 "items" (the captions and labels are what matter here)."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    canvases, captions, halves, _ = compose_captioned(items, np.arange(30) % 10, n, seed=seed)
    return CaptionDataset(torch.from_numpy(canvases)[:, None], captions, torch.from_numpy(halves),
                          classes=FMNIST_CLASSES, name="fake_captions")


def _task(train_set, eval_set=None, **args) -> CLIPTask:
    ctx = TaskContext(augment=AugmentConfig(), train_set=train_set, eval_set=eval_set or train_set,
                      collate=caption_collate, eval_batch_size=8)
    return CLIPTask(CLIPArgs(**args), ctx)


def _model_and_task(n: int = 24, seed: int = 0, **args) -> tuple[CLIP, CLIPTask, CaptionDataset]:
    data = _captioned(n, seed)
    task = _task(data, **args)
    torch.manual_seed(0)
    model = task.build_model(ModelConfig(name="clip_fmnist_tiny", args=dict(TINY)))
    task.setup(model)
    return model, task, data


def _batches(task: CLIPTask, dataset, batch_size: int = 8):
    return (task.prepare_batch(b, train=False) for b in task.ctx.iterate(dataset, batch_size))


# ------------------------------------------------------------------------------------------------ tokenizer
def test_caption_tokenizer_is_deterministic_and_ends_where_the_model_pools():
    captions = _captioned(200).captions
    tok = caption_tokenizer(captions, vocab_size=1000)
    assert tok.to_str() == caption_tokenizer(list(reversed(captions)), vocab_size=1000).to_str()
    sep = tok.token_to_id("[SEP]")
    enc = tok.encode("a small dark ankle boot to the left of a t-shirt")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]" and "[UNK]" not in enc.tokens
    assert "ankle" in enc.tokens and "sneaker" in tok.get_vocab()  # whole words
    small = caption_tokenizer(captions, vocab_size=60)  # too small for the words: characters carry them
    assert small.get_vocab_size() == 60 and "[UNK]" not in small.encode("a sneaker").tokens
    with pytest.raises(ConfigError, match="too small"):
        caption_tokenizer(captions, vocab_size=10)

    texts = ["a bag on the left", "a small dark ankle boot to the right of a light t-shirt"]
    ids, mask = tokenize(configured_tokenizer(tok, 8), texts)
    assert ids.shape == (2, 8) and ids[1, -1] == sep  # truncation keeps [SEP]
    real = mask.sum(1)
    assert real.tolist() == [7, 8] and ids[0, 7] == tok.token_to_id("[PAD]")
    # the model built by the task pools exactly at [SEP], the last real token
    assert torch.equal(eot_index(ids, sep), real - 1)


def test_the_model_refuses_a_tokenizer_it_would_read_elsewhere():
    tok = caption_tokenizer(_captioned(50).captions)
    sep = tok.token_to_id("[SEP]")
    model = vitkit.create_model("clip_fmnist_tiny", **TINY, vocab_size=100, eos_token_id=sep)
    model.set_tokenizer(tok)
    assert model.model_args["tokenizer"] == json.loads(tok.to_str())
    for eos in (99, tok.token_to_id("[CLS]")):  # absent id: read at position 0; [CLS] = 2: the legacy argmax rule
        other = vitkit.create_model("clip_fmnist_tiny", **TINY, vocab_size=100, eos_token_id=eos)
        with pytest.raises(ValueError, match="end-of-text"):
            other.set_tokenizer(tok)
    with pytest.raises(ConfigError, match="end-of-text"):
        vitkit.create_model("clip_fmnist_tiny", **TINY, tokenizer=tok.to_str())  # eos 999, never in its texts
    with pytest.raises(ConfigError, match="vocab_size"):
        vitkit.create_model("clip_fmnist_tiny", **TINY, vocab_size=20, eos_token_id=sep, tokenizer=tok.to_str())


def test_tokenizer_round_trips_through_checkpoints(tmp_path):
    model, task, data = _model_and_task()
    sep = model.tokenizer.token_to_id("[SEP]")
    assert model.eos_token_id == sep and model.vocab_size == model.tokenizer.get_vocab_size()
    assert model.img_size == (28, 56) and model.in_chans == 1  # from the data
    model.save_pretrained(tmp_path / "ckpt")
    loaded = vitkit.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.tokenizer.to_str() == model.tokenizer.to_str()
    assert checkpoint_tokenizer(tmp_path / "ckpt").to_str() == model.tokenizer.to_str()
    assert copy.deepcopy(model).tokenizer.to_str() == model.tokenizer.to_str()  # the EMA copy keeps it
    batch = next(_batches(task, data))
    model.eval()
    with torch.no_grad():
        a = model(batch["images"], batch["input_ids"], batch["attention_mask"]).logits_per_image
        b = loaded(batch["images"], batch["input_ids"], batch["attention_mask"]).logits_per_image
    assert torch.equal(a, b)
    # a new run from the checkpoint takes its tokenizer (not a new one from its own captions)
    other = _task(_captioned(30, seed=5))
    again = other.build_model(ModelConfig(name="clip_fmnist_tiny", pretrained=str(tmp_path / "ckpt"),
                                          args=dict(TINY, vocab_size=model.vocab_size, eos_token_id=sep,
                                                    img_size=[28, 56])))
    assert again.tokenizer.to_str() == model.tokenizer.to_str()


def test_task_settings_and_refusals():
    data = _captioned(8)
    with pytest.raises(ConfigError, match="hflip"):
        CLIPTask(CLIPArgs(), TaskContext(augment=AugmentConfig(hflip=True), train_set=data))
    with pytest.raises(ConfigError, match="exactly one"):
        CLIPArgs(templates=["a photo"])
    with pytest.raises(ConfigError, match="does not take"):
        build_task("clip", {"temperature": 0.1})
    task = _task(data)
    assert task.primary_metric == "zeroshot_top1" and task.class_names == WORDS
    unlabelled = CaptionDataset(data.images, data.captions)
    assert _task(unlabelled).primary_metric == "recall@1"  # no class labels: retrieval picks the best checkpoint
    with pytest.raises(ConfigError, match="CLIP model"):
        task.build_model(ModelConfig(name="vit_fmnist_tiny"))
    with pytest.raises(ConfigError, match="distort"):
        task.build_model(ModelConfig(name="clip_fmnist_tiny", args=dict(TINY, img_size=28)))


# ------------------------------------------------------------------------------------------------ training
def test_training_step_lowers_the_loss():
    model, task, data = _model_and_task(16)
    model.train()
    batch = task.prepare_batch(caption_collate(data.__getitems__(list(range(16)))), train=True)
    assert batch["images"].dtype == torch.float32 and batch["input_ids"].shape[0] == 16
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):  # the fresh image tower maps every canvas to nearly the same embedding: a slow start
        loss, stats = task.training_step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert stats["count"] == 16 and 0 <= stats["acc"] <= 16 and stats["loss"] == pytest.approx(16 * losses[-1])
        assert stats["scale"] / 16 == pytest.approx(1 / 0.07, rel=0.05)
    assert min(losses[-3:]) < 0.85 * losses[0], losses


def test_training_step_takes_negatives_from_every_process():
    """As rank 1 of 2: image and text features are gathered (in that order, with gradients), and the loss is
    clip_loss with the positives at columns B..2B-1."""
    model, task, data = _model_and_task(8)
    torch.manual_seed(1)
    others = {}
    calls = []

    def gather(t: torch.Tensor) -> torch.Tensor:
        calls.append((tuple(t.shape), t.requires_grad))
        other = others.setdefault(len(calls) % 2, F.normalize(torch.randn_like(t), dim=-1))
        return torch.cat([other, t])  # rank 0's rows first

    task.ctx = TaskContext(rank=1, world_size=2, all_gather=gather)
    batch = task.prepare_batch(caption_collate(data.__getitems__(list(range(8)))), train=True)
    loss, _ = task.training_step(model, batch)
    assert calls == [((8, 16), True), ((8, 16), True)]
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], embeddings=True)
    replay = iter([others[1], others[0]])
    expected = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale,
                         lambda t: torch.cat([next(replay), t]), rank=1, world_size=2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None for n in ("logit_scale", "text_projection.weight", "visual.head.weight"))


# ------------------------------------------------------------------------------------------------ evaluation
class TableCLIP(nn.Module):
    """A stand-in CLIP whose numbers can be worked out by hand. A text embeds as the sum of fixed random vectors
    per (position, token), so word order matters (a caption and its swapped version differ); an image's first
    pixel is the row of ``image_table`` that is its embedding."""

    def __init__(self, vocab: int, context: int = 32, dim: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(context, vocab, dim, generator=g)
        self.image_table = torch.zeros(1, dim)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.embed_dim, self.context_length = dim, context

    def encode_text(self, ids, mask=None, normalize=False):
        mask = torch.ones_like(ids) if mask is None else mask
        e = (self.table[torch.arange(ids.shape[1])[None], ids] * mask[..., None]).sum(1)
        return F.normalize(e, dim=-1) if normalize else e

    def encode_image(self, images, normalize=False):
        e = self.image_table[images[:, 0, 0, 0].long()]
        return F.normalize(e, dim=-1) if normalize else e


def _table_setup(captions: list[str], labels: torch.Tensor) -> tuple[TableCLIP, CLIPTask, list[dict]]:
    data = CaptionDataset(torch.zeros(len(captions), 1, 2, 2, dtype=torch.uint8), captions, labels,
                          classes=FMNIST_CLASSES)
    task = _task(data, templates=["a {} on the left", "a {} on the right"])
    tok = caption_tokenizer(captions + [f"a {w} on the left" for w in WORDS])
    task.tokenizer = configured_tokenizer(tok, 32)
    model = TableCLIP(tok.get_vocab_size())
    batches = []
    for start in range(0, len(captions), 7):
        rows = list(range(start, min(start + 7, len(captions))))
        ids, mask = tokenize(task.tokenizer, [captions[i] for i in rows])
        images = torch.tensor(rows, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 2, 2)
        batches.append({"images": images, "captions": [captions[i] for i in rows], "labels": labels[rows],
                        "input_ids": ids, "attention_mask": mask})
    return model, task, batches


def test_evaluate_on_hand_checkable_models():
    data = _captioned(60, seed=3)
    captions, labels = data.captions, data.labels
    assert len(set(captions)) < len(captions)  # duplicates: counted by text
    model, task, batches = _table_setup(captions, labels)
    ids, mask = tokenize(task.tokenizer, captions)
    texts = model.encode_text(ids, mask)

    model.image_table = texts  # each image embeds exactly as its caption
    m = task.evaluate(model, batches)
    for key in ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5", "recall@1", "hard_negative_acc"):
        assert m[key] == 1.0, key
    assert m["count"] == 60 and m["distinct_captions"] == len(set(captions))
    assert m["hard_negative_count"] == sum(swapped_caption(c) is not None for c in captions) > 0
    assert 0 <= m["zeroshot_top1"] <= 1 and m["zeroshot_count"] == 60

    distinct = sorted(set(captions))  # images embed as the next distinct caption: nothing is retrieved right
    nxt = {c: distinct[(i + 1) % len(distinct)] for i, c in enumerate(distinct)}
    model.image_table = model.encode_text(*tokenize(task.tokenizer, [nxt[c] for c in captions]))
    m = task.evaluate(model, batches)
    assert m["i2t_recall@1"] == 0 and m["t2i_recall@1"] == 0 and m["recall@5"] < 1

    # images embed as the mean of their items' class embeddings: zero-shot is right on every image
    classes = class_embeddings(model, task.tokenizer, WORDS, task.args.templates)
    present = torch.zeros(60, 10)
    for i, row in enumerate(labels.tolist()):
        for c in row:
            if c >= 0:
                present[i, c] = 1
    model.image_table = present @ classes
    m = task.evaluate(model, batches)
    assert m["zeroshot_top1"] == 1.0 and m["zeroshot_all_items"] == 1.0
    model.image_table = (1 - present) @ classes  # the mean of the classes that are absent
    m = task.evaluate(model, batches)
    assert m["zeroshot_top1"] == 0.0 and m["zeroshot_all_items"] == 0.0
    report = task.format_report(m)
    assert "zero-shot" in report and "recall@1" in report and "hard negatives" in report


class ThreadGroup:
    """``world`` simulated processes as threads: all_gather and all_reduce_sum meet at a barrier."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list = [None] * world

    def exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def ctx(self, rank: int, world: int, eval_set) -> TaskContext:
        return TaskContext(rank=rank, world_size=world, eval_set=eval_set, collate=caption_collate,
                           all_gather=lambda t: torch.cat(self.exchange(rank, t)),
                           all_reduce_sum=lambda t: torch.stack(self.exchange(rank, t)).sum(0))


def test_evaluate_gives_the_same_numbers_on_two_processes():
    model, task, _ = _model_and_task(24)
    model.eval()
    data = _captioned(21, seed=7)  # odd: the two shards differ in size
    single = task.evaluate(model, _batches(task, data, 4))
    group, results = ThreadGroup(2), {}

    def run(rank: int) -> None:
        t = CLIPTask(task.args, group.ctx(rank, 2, data))
        t.setup(model)
        results[rank] = t.evaluate(model, _batches(t, data, 4))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert set(results) == {0, 1}
    for key, value in single.items():
        if key.startswith("_") or key == "loss":  # the in-batch loss depends on the batches
            continue
        assert results[0][key] == pytest.approx(value) and results[1][key] == pytest.approx(value), key


# ------------------------------------------------------------------------------------------------ zero-shot
def test_zero_shot_averages_the_templates_and_predicts():
    model, task, data = _model_and_task(16)
    model.eval()
    images = task.prepare_batch(caption_collate(data.__getitems__([0, 1, 2])), train=False)["images"]
    templates = ["a {} on the left", "a {} on the right"]
    probs = zero_shot_classify(model, model.tokenizer, images, ["bag", "coat", "sneaker"], templates)
    assert probs.shape == (3, 3) and torch.allclose(probs.sum(1), torch.ones(3))
    with torch.no_grad():
        tok = configured_tokenizer(model.tokenizer, 32)
        per_template = [model.encode_text(*tokenize(tok, [t.format(c) for c in ("bag", "coat", "sneaker")]),
                                          normalize=True) for t in templates]
        classes = F.normalize((per_template[0] + per_template[1]) / 2, dim=-1)
        ref = model.logit_scale.exp().clamp(max=100) * model.encode_image(images, normalize=True) @ classes.T
    assert torch.allclose(probs, ref.softmax(-1), atol=1e-5)
    out = task.predict(model, images, topk=3)
    assert len(out) == 3 and len(out[0]["top"]) == 3 and out[0]["top"][0][0] in WORDS
    assert out[0]["top"][0][1] >= out[0]["top"][1][1]


def test_vitkit_zeroshot_command(tmp_path, capsys):
    from vitkit.cli import main

    model, _, data = _model_and_task(16)
    model.save_pretrained(tmp_path / "ckpt")
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"canvas{i}.png"))
        Image.fromarray(data.images[i, 0].numpy()).save(paths[-1])
    assert main(["zeroshot", str(tmp_path / "ckpt"), "--classes", "bag,coat,sneaker", "--topk", "2",
                 "--template", "a {} on the left", *paths]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == paths[0] and len(out) == 6 and out[1].strip().endswith(("bag", "coat", "sneaker"))
    assert main(["zeroshot", str(tmp_path / "ckpt"), "--classes", "bag,coat,sneaker", "--json", *paths]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == paths and sum(p for _, p in rows[0]["top"]) == pytest.approx(1.0)
    assert main(["zeroshot", str(tmp_path / "ckpt"), "--classes", "bag", *paths]) == 2  # one class: an error line
    assert "at least two" in capsys.readouterr().err


def test_vitkit_retrieve_command_ranks_by_clip_similarity(tmp_path, capsys):
    from vitkit.cli import main
    from vitkit.tools.predict import retrieval_scores

    model, task, data = _model_and_task(16)
    model.save_pretrained(tmp_path / "ckpt")
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"canvas{i}.png"))
        Image.fromarray(data.images[i, 0].numpy()).save(paths[-1])
    texts = [data.captions[0], data.captions[1], "a bag on the left"]
    scores = retrieval_scores(tmp_path / "ckpt", paths, texts)
    with torch.no_grad():  # the same numbers from the model directly (the PNGs hold the dataset's pixels)
        images = task.prepare_batch(caption_collate(data.__getitems__([0, 1, 2])), train=False)["images"]
        tok = configured_tokenizer(model.tokenizer, model.context_length)
        ref = (model.logit_scale.exp().clamp(max=100) * model.encode_image(images, normalize=True)
               @ model.encode_text(*tokenize(tok, texts), normalize=True).T)
    assert scores.shape == (3, 3) and torch.allclose(scores, ref, atol=1e-4)
    assert main(["retrieve", str(tmp_path / "ckpt"), *paths, "--text", texts[0], "--text", texts[2],
                 "--topk", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in rows] == [texts[0], texts[2]] and len(rows[0]["matches"]) == 2
    assert rows[0]["matches"][0][0] == paths[int(ref[:, 0].argmax())]
    (tmp_path / "captions.txt").write_text("\n".join(texts) + "\n")
    assert main(["retrieve", str(tmp_path / "ckpt"), paths[1], "--texts-file", str(tmp_path / "captions.txt"),
                 "--to-text"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == paths[1] and len(out) == 4 and out[1].strip().endswith(texts[int(ref[1].argmax())])
    assert main(["retrieve", str(tmp_path / "ckpt"), *paths]) == 2  # no text: one error line
    assert "at least one image file and one text" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ a whole run
def test_training_run_writes_the_primary_metric(tmp_path, data_no_system_dirs):  # noqa: F811
    from vitkit.engine import train
    from vitkit.tools.predict import zero_shot_files

    write_fake_fmnist(tmp_path / "fm", n_train=30, n_test=10)
    overrides = [
        "task.name=clip", "task.args.templates=['a {} on the left', 'a {} on the right']",
        "model.name=clip_fmnist_tiny",
        *(f"model.args.{k}={v}" for k, v in TINY.items()), "data.name=fmnist_captions",
        f"data.data_dir={tmp_path / 'fm'}", "data.args.num=64", "train.epochs=1", "train.batch_size=32",
        "train.eval_batch_size=16", "train.threads=1", "train.bf16=false", "train.progress=false",
        f"output_dir={tmp_path / 'run'}",
    ]
    summary = train(None, overrides)
    assert summary["primary_metric"] == "zeroshot_top1" and summary["task"] == "clip"
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= saved["best"]["zeroshot_top1"] <= 1 and saved["zeroshot_class_names"] == WORDS
    assert {"recall@1", "i2t_recall@5", "hard_negative_acc"} <= set(saved["final"])
    config = json.loads((tmp_path / "run" / "checkpoints" / "best" / "config.json").read_text())
    assert config["model_args"]["tokenizer"] and config["pretrained_cfg"]["task"] == "clip"
    Image.fromarray(np.zeros((28, 56), np.uint8)).save(tmp_path / "blank.png")
    result = zero_shot_files(tmp_path / "run", [tmp_path / "blank.png"], ["bag", "coat"])  # the run's templates
    assert len(result[0]["top"]) == 2


def test_words_outside_the_vocabulary_are_named():
    from vitkit.tasks._text import unknown_words, warn_unknown_words

    tok = caption_tokenizer(["a red coat on the left", "a blue bag"], vocab_size=100)
    assert unknown_words(tok, ["a red coat", "a zebra", "sneaker 🙂", "a zebra"]) == ["zebra", "sneaker", "🙂"]
    assert unknown_words(tok, ["a red coat", "blue bag"]) == []
    with pytest.warns(UserWarning, match=r"2 word\(s\) outside the tokenizer's vocabulary.*'zebra', 'sneaker'"):
        warn_unknown_words(tok, ["zebra", "sneaker"], "zero-shot class names")
