"""CLIP training (Radford et al., 2021): symmetric InfoNCE over image-caption pairs, negatives from every process.

**Tokenizer.** A model trained from scratch gets a tokenizer built once from the training captions
(:func:`caption_tokenizer`): deterministic by construction, because every ``torchrun`` process builds its own
(checked to agree) and a resumed run builds it again. ``tokenizers``' WordPiece trainer breaks frequency ties in
hash order, so two trainings on the same captions give different vocabularies; caption vocabularies are small,
so whole words (most frequent first, ties by spelling) plus single characters for anything unseen suffice. The
tokenizer travels **inside the model**, as its ``tokenizer`` constructor argument (see
:meth:`vitkit.models.clip.CLIP.set_tokenizer`): ``config.json`` holds it next to the other arguments and is
written with the weights in the checkpoint's temporary folder that is swapped in whole, so weights and tokenizer
cannot disagree, and ``from_pretrained`` rebuilds both, so ``vitkit eval``, ``predict``, ``zeroshot`` and
``serve`` tokenize as training did without knowing where the checkpoint came from. (``pretrained_cfg`` would be
the natural home, but loading keeps only the normalisation, class names and task from it.)

**End of text.** The tokenizer's template is ``[CLS] text [SEP]``; the model is built with
``eos_token_id = id([SEP])``, which is never 2 (the legacy "highest id" rule), so the text tower is read at the
first ``[SEP]``: the last real token, also after truncation (the template keeps its special tokens) and before
any padding. ``CLIP.set_tokenizer`` refuses a tokenizer whose texts would be read anywhere else.

**Evaluation** (every number is exact for any process count: each process embeds its shard, the gallery is
gathered, sums are reduced):

* retrieval recall@1/5 in both directions over the whole evaluation set. Captions repeat ("a bag on the left"),
  so a retrieval counts when the retrieved caption's *text* equals the true one: image -> text ranks the
  distinct caption texts; text -> image ranks all images and accepts any image with the same caption.
  ``recall@1`` / ``recall@5`` are the means of both directions;
* zero-shot classification when the evaluation set has class labels: each class is the mean of its normalised
  prompt embeddings (one per template), renormalised (the CLIP paper's prompt ensembling). A canvas of captioned
  Fashion-MNIST holds one or two items (``labels``: one class per half, -1 empty): ``zeroshot_top1`` counts an
  image when its top class is one of the classes present; ``zeroshot_all_items`` when its k top classes are
  exactly the k distinct classes present (for one item, the same as top-1);
* ``hard_negative_acc``: how often a two-item caption scores above its positions-swapped version
  (:func:`~vitkit.data.captions.swapped_caption`), which only a model that reads positions can get above 50%;
* the in-batch contrastive loss (its level depends on the evaluation batch size, its trend does not).

The primary metric is ``zeroshot_top1`` when the evaluation set has class labels, else ``recall@1``: on
captioned canvases an image has several equally valid captions (size and tone are mentioned at random), which
caps caption-exact retrieval well below 1, while zero-shot accuracy measures what the embedding learned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.captions import CAPTION_WORDS, swapped_caption
from ..data.constants import FMNIST_CLASSES
from ..errors import ConfigError, DataError
from ..models import create_model
from ..models.clip import CLIP, clip_loss, logit_scale_multiplier
from ._text import check_same_tokenizer, checkpoint_tokenizer, warn_unknown_words
from .base import Batch, Task, TaskContext, build_configured_model, checkpoint_folder, register_task

DEFAULT_TEMPLATES = ("a photo of a {}", "a {}")
RETRIEVAL_KS = (1, 5)


# ---------------------------------------------------------------------------- tokenizer
def caption_tokenizer(texts: Iterable[str], vocab_size: int = 1000, lowercase: bool = True) -> Any:
    """The deterministic caption tokenizer of :func:`vitkit.data.captions.train_tokenizer`, with the task's error."""
    from ..data.captions import train_tokenizer

    try:
        return train_tokenizer(list(texts), vocab_size, lowercase)
    except DataError as e:
        raise ConfigError(f"task clip: {e}") from None


def configured_tokenizer(tokenizer: Any, context_length: int) -> Any:
    """A copy of ``tokenizer`` that truncates to ``context_length`` tokens (keeping the template's special
    tokens, so the end-of-text token survives) and pads a batch to its longest text (with the tokenizer's own
    pad id, else ``[PAD]``, else 0; padding is masked and comes after the end-of-text token)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    limit = context_length
    if tok.truncation is not None:
        limit = min(limit, int(tok.truncation["max_length"]))
    tok.enable_truncation(max_length=limit)
    if tok.padding is not None:
        pad_id = int(tok.padding["pad_id"])
    else:
        pad_id = tok.token_to_id("[PAD]")
        pad_id = 0 if pad_id is None else pad_id
    tok.enable_padding(pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "[PAD]")
    return tok


def tokenize(tokenizer: Any, texts: Sequence[str], device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, N) int64, of ``texts`` with a :func:`configured_tokenizer`."""
    encodings = tokenizer.encode_batch([str(t) for t in texts])
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def model_tokenizer(model: nn.Module, folder: str | Path | None = None) -> Any:
    """The tokenizer ``model`` carries, else the one saved with its checkpoint ``folder``; a ConfigError
    saying how to get one otherwise."""
    tok = getattr(model, "tokenizer", None)
    if tok is None and folder is not None:
        tok = checkpoint_tokenizer(folder)
    if tok is None:
        raise ConfigError(f"this {type(model).__name__} carries no tokenizer and none lies beside it: train it with "
                          f"the clip task (which stores one), or give it one with model.set_tokenizer(...)")
    return tok


def _text_hashes(texts: Sequence[str]) -> torch.Tensor:
    """A 63-bit fingerprint per text: equal texts compare equal across processes (strings cannot be gathered)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") >> 1
                         for t in texts], dtype=torch.long)


# ---------------------------------------------------------------------------- zero-shot
@torch.no_grad()
def class_embeddings(model: nn.Module, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str]
                     ) -> torch.Tensor:
    """(C, D) unit class embeddings: the mean of each class's normalised prompt embeddings, renormalised.

    ``tokenizer`` is a :func:`configured_tokenizer`."""
    if not class_names or not templates:
        raise ConfigError("zero-shot classification needs at least one class name and one template")
    prompts = [t.format(c) for c in class_names for t in templates]
    device = next(model.parameters()).device
    ids, mask = tokenize(tokenizer, prompts, device)
    emb = model.encode_text(ids, mask, normalize=True).float()
    emb = emb.reshape(len(class_names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def zero_shot_classify(model: nn.Module, tokenizer: Any, images: torch.Tensor, class_names: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES, context_length: int | None = None
                       ) -> torch.Tensor:
    """(B, C) class probabilities of prepared (normalised) images: a softmax over the model's scaled cosine
    similarities with the prompt-ensembled class embeddings (:func:`class_embeddings`)."""
    check_templates(templates)
    tok = configured_tokenizer(tokenizer, min(context_length or model.context_length, model.context_length))
    classes = class_embeddings(model, tok, class_names, templates)
    image = model.encode_image(images.to(classes.device), normalize=True).float()
    return (logit_scale_multiplier(model.logit_scale.detach()).float() * image @ classes.T).softmax(-1)


def check_templates(templates: Sequence[str]) -> None:
    """Every template must hold exactly one ``{}`` (where the class name goes)."""
    for t in templates:
        rest = t.replace("{}", "", 1) if isinstance(t, str) else ""
        if not isinstance(t, str) or t.count("{}") != 1 or "{" in rest or "}" in rest:
            raise ConfigError(f"zero-shot template {t!r} must contain exactly one '{{}}' and no other braces")


# ---------------------------------------------------------------------------- the task
@dataclass
class CLIPArgs:
    """``task.args`` of the clip task."""

    vocab_size: int = 1000  # at most this many tokens in the tokenizer built from the training captions
    context_length: int | None = None  # tokens per caption with [CLS]/[SEP] (None: the model's context_length)
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # zero-shot prompts per class
    class_names: list[str] | None = None  # the word(s) for each class in prompts (None: from the dataset)

    def __post_init__(self) -> None:
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 8:
            raise ConfigError(f"task clip: task.args.vocab_size={self.vocab_size!r} must be an integer >= 8")
        if self.context_length is not None and (isinstance(self.context_length, bool)
                                                or not isinstance(self.context_length, int)
                                                or self.context_length < 2):
            raise ConfigError(f"task clip: task.args.context_length={self.context_length!r} must be an integer "
                              f">= 2 ([CLS] and [SEP]) or null")
        if isinstance(self.templates, str) or not list(self.templates):
            raise ConfigError("task clip: task.args.templates must be a non-empty list of strings with '{}'")
        self.templates = [str(t) for t in self.templates]
        check_templates(self.templates)
        if self.class_names is not None:
            if isinstance(self.class_names, str) or not list(self.class_names):
                raise ConfigError("task clip: task.args.class_names must be a non-empty list of strings or null")
            self.class_names = [str(c) for c in self.class_names]


def prompt_words(classes: Sequence[str]) -> list[str]:
    """How prompts name a dataset's classes: Fashion-MNIST's classes by the words its captions use
    ("T-shirt/top" -> "t-shirt"), any other dataset's by their names."""
    return list(CAPTION_WORDS) if list(classes) == list(FMNIST_CLASSES) else [str(c) for c in classes]


def _has_labels(dataset: Any) -> bool:
    return getattr(dataset, "labels", None) is not None and bool(getattr(dataset, "classes", None))


@register_task
class CLIPTask(Task):
    name = "clip"
    primary_metric = "zeroshot_top1"  # "recall@1" for an evaluation set without class labels (see __init__)
    mode = "max"
    Args = CLIPArgs
    capabilities = frozenset({"zero_shot", "retrieve"})

    def __init__(self, args: Any = None, ctx: TaskContext | None = None) -> None:
        super().__init__(args, ctx)
        aug = self.ctx.augment
        if aug is not None:
            if aug.hflip:
                raise ConfigError("the clip task cannot flip images: captions name left and right; set "
                                  "augment.hflip=false")
            if aug.mixup_alpha > 0 or aug.cutmix_alpha > 0 or aug.label_smoothing > 0:
                raise ConfigError("the clip task has no class targets to mix or smooth; remove augment.mixup_alpha, "
                                  "cutmix_alpha and label_smoothing")
        self.tokenizer: Any = None  # configured (truncating, padding) copy of the model's tokenizer, from setup
        self.class_names = self._class_names()
        if self.ctx.eval_set is not None and not (_has_labels(self.ctx.eval_set) and self.class_names):
            self.primary_metric = "recall@1"  # type: ignore[misc]  # an instance's own choice, read by the trainer

    def _class_names(self) -> list[str] | None:
        if self.args.class_names is not None:
            return list(self.args.class_names)
        for dataset in (self.ctx.eval_set, self.ctx.train_set):
            if getattr(dataset, "classes", None):
                return prompt_words(dataset.classes)
        return None

    # ------------------------------------------------------------------ model
    def build_model(self, model_cfg: Any) -> nn.Module:
        """A CLIP with the tokenizer it trains with: the pretrained checkpoint's, or one built from the training
        captions (then the model's vocabulary, end-of-text id, channels and image size follow the data)."""
        from ..models import registered_class

        cls = registered_class(model_cfg.name) if model_cfg.name is not None else CLIP  # else: checked below
        if cls is None or not issubclass(cls, CLIP):
            raise ConfigError(f"task clip needs a CLIP model (e.g. clip_fmnist_tiny); {model_cfg.name!r} is not one")
        args = dict(model_cfg.args)
        train_set = self.ctx.train_set
        if model_cfg.pretrained:
            folder = checkpoint_folder(model_cfg.pretrained)
            model = build_configured_model(model_cfg)
            if not isinstance(model, CLIP):
                raise ConfigError(f"task clip needs a CLIP model; {model_cfg.pretrained} holds a "
                                  f"{type(model).__name__}")
            model.set_tokenizer(model_tokenizer(model, folder))
        else:
            captions = getattr(train_set, "captions", None)
            if not captions:
                raise DataError("task clip trains on captioned images (data.name: fmnist_captions or "
                                "caption_folder); this training set has no captions")
            tok = caption_tokenizer(captions, self.args.vocab_size)
            check_same_tokenizer(self.ctx, tok)
            eos = tok.token_to_id("[SEP]")
            if args.get("eos_token_id", eos) != eos:
                raise ConfigError(f"model.args.eos_token_id={args['eos_token_id']} but the captions' tokenizer ends "
                                  f"texts with [SEP] = {eos}; drop eos_token_id to take it from the tokenizer")
            args.update(eos_token_id=eos, tokenizer=json.loads(tok.to_str()))
            args.setdefault("vocab_size", tok.get_vocab_size())
            if self.args.context_length is not None:
                args.setdefault("context_length", self.args.context_length)
            args.setdefault("in_chans", train_set.num_channels)
            args.setdefault("img_size", list(train_set.image_size))
            model = create_model(model_cfg.name, **args)
            model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(train_set.mean),
                                    "std": tuple(train_set.std)}
        if train_set is not None and getattr(train_set, "image_size", None):
            (h, w), (mh, mw) = train_set.image_size, model.img_size
            if h * mw != w * mh:
                raise ConfigError(f"the model takes {mh}x{mw} images, the data are {h}x{w}: resizing would distort "
                                  f"them (and the positions captions name); set model.args.img_size: [{h}, {w}]")
        if self.class_names:
            model.pretrained_cfg = {**model.pretrained_cfg, "class_names": list(self.class_names)}
        return model

    def setup(self, model: nn.Module) -> None:
        """Image transforms (base class) and the model's tokenizer, truncating to the context length."""
        super().setup(model)
        if not callable(getattr(model, "encode_text", None)):
            raise ConfigError(f"task clip needs a CLIP model, got a {type(model).__name__}")
        context = min(self.args.context_length or model.context_length, model.context_length)
        self.tokenizer = configured_tokenizer(model_tokenizer(model), context)

    def prepare_batch(self, batch: Batch, train: bool) -> Batch:
        """Images normalised (and augmented when training); captions -> ``input_ids`` + ``attention_mask``."""
        prepared = super().prepare_batch(batch, train)
        if not isinstance(prepared, Mapping) or "captions" not in prepared:
            if train:
                raise DataError("task clip trains on dict batches with 'images' and 'captions' (caption datasets)")
            return prepared  # images alone: predict
        ids, mask = tokenize(self.tokenizer, prepared["captions"], prepared["images"].device)
        return {**prepared, "input_ids": ids, "attention_mask": mask}

    # ------------------------------------------------------------------ training
    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Symmetric InfoNCE of the local pairs against the captions and images of every process; ``acc`` is
        the share of images whose best caption in the local batch has their caption's text."""
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"], embeddings=True)
        ctx = self.ctx
        loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale, ctx.all_gather, ctx.rank,
                         ctx.world_size)
        captions = batch["captions"]
        n = len(captions)
        with torch.no_grad():
            sims = F.normalize(out.image_embeds.float(), dim=-1) @ F.normalize(out.text_embeds.float(), dim=-1).T
            best = sims.argmax(1).tolist()
            correct = sum(captions[j] == captions[i] for i, j in enumerate(best))
            scale = float(logit_scale_multiplier(out.logit_scale.detach()))
        return loss, {"loss": loss.item() * n, "acc": correct, "scale": scale * n, "count": n}

    # ------------------------------------------------------------------ evaluation
    def _gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every process's rows of ``t`` (their counts: ``sizes``), rank after rank; shards may differ in size."""
        if self.ctx.world_size == 1:
            return t
        most = max(sizes)
        padded = torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])]).contiguous()
        gathered = self.ctx.all_gather(padded)
        keep = torch.cat([torch.arange(r * most, r * most + s) for r, s in enumerate(sizes)]).to(gathered.device)
        return gathered[keep]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
        """Retrieval, zero-shot, hard-negative and in-batch loss over the (sharded) evaluation set."""
        ctx, device = self.ctx, next(model.parameters()).device
        names, templates = self.class_names, self.args.templates
        classes = class_embeddings(model, self.tokenizer, names, templates) if names else None
        # loss, pairs in loss, hard-negative right / total, zero-shot top-1 / all-items / images
        sums = torch.zeros(7, dtype=torch.float64)
        images, texts, hashes = [], [], []
        for batch in batches:
            captions = list(batch["captions"])
            n = len(captions)
            img = model.encode_image(batch["images"]).float()
            txt = model.encode_text(batch["input_ids"], batch["attention_mask"]).float()
            if n >= 2:
                sums[0] += clip_loss(img, txt, model.logit_scale).item() * n
                sums[1] += n
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
            images.append(img)
            texts.append(txt)
            hashes.append(_text_hashes(captions))
            pairs = [(i, s) for i, c in enumerate(captions) if (s := swapped_caption(c)) is not None]
            if pairs:
                rows = torch.tensor([i for i, _ in pairs], device=img.device)
                ids, mask = tokenize(self.tokenizer, [s for _, s in pairs], img.device)
                swapped = F.normalize(model.encode_text(ids, mask).float(), dim=-1)
                true = (img[rows] * txt[rows]).sum(-1)
                sums[2] += float((true > (img[rows] * swapped).sum(-1)).sum())
                sums[3] += len(pairs)
            if classes is not None and "labels" in batch:
                sums[4:] += torch.tensor(self._zero_shot_counts(img @ classes.T, batch["labels"]), dtype=torch.float64)
        dim = int(getattr(model, "embed_dim", 0)) or (classes.shape[1] if classes is not None else 1)
        img = torch.cat(images) if images else torch.zeros(0, dim, device=device)
        txt = torch.cat(texts) if texts else torch.zeros(0, dim, device=device)
        hsh = torch.cat(hashes).to(img.device) if hashes else torch.zeros(0, dtype=torch.long, device=device)
        local = torch.zeros(ctx.world_size, dtype=torch.float64, device=ctx.device)
        local[ctx.rank] = img.shape[0]
        sizes = [int(v) for v in ctx.all_reduce_sum(local).tolist()]
        all_img, all_txt, all_hsh = (self._gather(t, sizes) for t in (img, txt, hsh))
        hits = self._retrieval_hits(img, txt, hsh, all_img, all_txt, all_hsh)
        totals = ctx.all_reduce_sum(torch.cat([hits, sums]).to(ctx.device)).cpu().tolist()
        k = len(RETRIEVAL_KS)
        i2t, t2i, rest = totals[:k], totals[k:2 * k], totals[2 * k:]
        loss, loss_n, hard, hard_n, zs_top1, zs_all, zs_n = rest
        count = sum(sizes)
        metrics: dict[str, Any] = {}
        if names is not None and zs_n > 0:
            metrics.update(zeroshot_top1=zs_top1 / zs_n, zeroshot_all_items=zs_all / zs_n, zeroshot_count=int(zs_n))
        for j, kk in enumerate(RETRIEVAL_KS):
            metrics[f"i2t_recall@{kk}"] = i2t[j] / max(1, count)
            metrics[f"t2i_recall@{kk}"] = t2i[j] / max(1, count)
            metrics[f"recall@{kk}"] = (i2t[j] + t2i[j]) / (2 * max(1, count))
        if hard_n > 0:
            metrics.update(hard_negative_acc=hard / hard_n, hard_negative_count=int(hard_n))
        metrics.update(loss=loss / max(1.0, loss_n), count=count, distinct_captions=int(torch.unique(all_hsh).numel()),
                       _class_names=names, _templates=list(templates))
        return metrics

    @staticmethod
    def _zero_shot_counts(scores: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """(top class is present, the k best classes are the k present ones, images with any class) of a batch;
        ``labels``: (B,) or (B, L) class indices, -1 for none."""
        labels = labels.to(scores.device).long()
        labels = labels[:, None] if labels.ndim == 1 else labels
        if labels.numel() and int(labels.max()) >= scores.shape[1]:
            raise DataError(f"label {int(labels.max())} has no class name (zero-shot classes: {scores.shape[1]})")
        classes = scores.shape[1]  # an empty half (-1) goes to an extra column, dropped after
        present = torch.zeros(scores.shape[0], classes + 1, dtype=torch.bool, device=scores.device)
        present.scatter_(1, labels.masked_fill(labels < 0, classes), True)
        present = present[:, :classes]
        valid = present.any(1)
        top1 = present.gather(1, scores.argmax(1, keepdim=True))[:, 0]
        lowest_present = scores.masked_fill(~present, float("inf")).min(1).values
        highest_absent = scores.masked_fill(present, float("-inf")).max(1).values
        all_items = lowest_present > highest_absent
        return [float((top1 & valid).sum()), float((all_items & valid).sum()), float(valid.sum())]

    @staticmethod
    def _retrieval_hits(img: torch.Tensor, txt: torch.Tensor, hsh: torch.Tensor, all_img: torch.Tensor,
                        all_txt: torch.Tensor, all_hsh: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Hits at each k of RETRIEVAL_KS of the local queries against the whole gallery: image -> distinct caption
        texts, then text -> images (a hit: the retrieved item's caption text is the query's)."""
        hits = torch.zeros(2 * len(RETRIEVAL_KS), dtype=torch.float64)
        if img.shape[0] == 0 or all_img.shape[0] == 0:
            return hits
        distinct, inverse = torch.unique(all_hsh, return_inverse=True)
        first = torch.full((len(distinct),), all_hsh.shape[0], dtype=torch.long, device=all_hsh.device)
        first.scatter_reduce_(0, inverse, torch.arange(all_hsh.shape[0], device=all_hsh.device), reduce="amin")
        galleries = ((img, all_txt[first], distinct), (txt, all_img, all_hsh))
        for d, (queries, gallery, gallery_hsh) in enumerate(galleries):
            k_max = min(max(RETRIEVAL_KS), gallery.shape[0])
            for start in range(0, queries.shape[0], chunk):
                top = (queries[start:start + chunk] @ gallery.T).topk(k_max, dim=1).indices
                hit = gallery_hsh[top] == hsh[start:start + chunk, None]
                for j, k in enumerate(RETRIEVAL_KS):
                    hits[d * len(RETRIEVAL_KS) + j] += float(hit[:, :k].any(1).sum())
        return hits

    def summary_fields(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"zeroshot_class_names": metrics.get("_class_names"), "zeroshot_templates": metrics.get("_templates")}

    def format_report(self, metrics: dict[str, Any]) -> str:
        m = metrics
        lines = []
        if "zeroshot_top1" in m:
            lines.append(f"zero-shot: top-1 {100 * m['zeroshot_top1']:.2f}% (top class is an item of the image), all "
                         f"items ranked first {100 * m['zeroshot_all_items']:.2f}% ({m['zeroshot_count']} images, "
                         f"{len(m['_class_names'])} classes x {len(m['_templates'])} templates)")
        lines.append(f"retrieval recall@1 / @5: image->text {100 * m['i2t_recall@1']:.2f}% / "
                     f"{100 * m['i2t_recall@5']:.2f}%, text->image {100 * m['t2i_recall@1']:.2f}% / "
                     f"{100 * m['t2i_recall@5']:.2f}% ({m['count']} pairs, {m['distinct_captions']} distinct captions)")
        if "hard_negative_acc" in m:
            lines.append(f"hard negatives: the true caption beats its position-swapped version "
                         f"{100 * m['hard_negative_acc']:.2f}% of {m['hard_negative_count']} two-item captions")
        lines.append(f"in-batch contrastive loss {m['loss']:.4f}")
        return "\n".join(lines)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, topk: int = 5, **kw: Any) -> list[dict[str, Any]]:
        """Top-k zero-shot classes with probabilities (classes: ``class_names=`` (the served page's text box), else
        ``task.args.class_names``, else the names the model was trained with in this process)."""
        names = kw.get("class_names") or self.class_names or model.pretrained_cfg.get("class_names")
        if not names:
            raise ConfigError("no zero-shot classes for this CLIP: set task.args.class_names in its recipe, or use "
                              "vitkit zeroshot RUN --classes a,b,c IMAGE...")
        probs = self.zero_shot(model, images, names)
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        return [{"top": [(names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]}
                for vals, idx in zip(top.values, top.indices)]

    # ------------------------------------------------------------------ tools
    @torch.no_grad()
    def zero_shot(self, model: nn.Module, images: torch.Tensor, class_names: Sequence[str],
                  templates: Sequence[str] | None = None) -> torch.Tensor:
        """(B, C) probabilities over ``class_names`` with the run's templates (or ``templates``); names with words
        outside the vocabulary are named in a warning."""
        names = [str(c).strip() for c in class_names if str(c).strip()]
        if len(names) < 2:
            raise ConfigError(f"zero-shot classification needs at least two class names, got {names}")
        warn_unknown_words(self.tokenizer, names, "zero-shot class names")
        return zero_shot_classify(model, self.tokenizer, images, names, list(templates or self.args.templates))

    @torch.no_grad()
    def retrieval_scores(self, model: nn.Module, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of the normalised embeddings, times the learned scale (images x texts)."""
        warn_unknown_words(self.tokenizer, texts, "retrieval texts")
        ids, mask = tokenize(self.tokenizer, texts, images.device)
        img = model.encode_image(images, normalize=True).float()
        txt = model.encode_text(ids, mask, normalize=True).float()
        return logit_scale_multiplier(model.logit_scale.detach()).float() * img @ txt.T
