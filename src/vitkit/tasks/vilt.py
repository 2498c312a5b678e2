"""ViLT pretraining (Kim et al., 2021): image-text matching, whole-word masked language modelling, and word-patch
alignment by optimal transport, on any dataset of captioned images (``{"images", "captions"[, "labels"]}``).

Per step, as the official ``vilt/modules/objectives.py`` (``compute_itm_wpa``, ``compute_mlm``):

* **ITM.** ``round(swap_prob * B)`` pairs of the batch (exactly half by default, as the official code) become
  negatives: the caption is paired with **another sample's image** of the batch. When the batch carries
  ``labels`` (class per canvas half, -1 = empty), the other image is drawn among those the caption cannot describe
  (one of the caption's items is missing from it), so a chance match is never labelled negative
  (``avoid_false_negatives``). With ``hard_negative_prob`` a negative instead keeps its image and takes the
  position-swapped caption (:func:`~vitkit.data.captions.swapped_caption`), which only a model that reads
  positions rejects. The model's ITM head is ``rank_output``, one logit (HF ``ViltForImageAndTextRetrieval``),
  so the loss is BCE-with-logits; the official 2-way softmax is the same model of one logit difference.
* **MLM** on clean pairs only. By default (``joint_pass=False``, the official layout) the masked captions go
  with their own images as extra rows of the same forward call (one call per step, which DDP needs); with
  ``joint_pass`` the ITM rows carry the masked text and only the matching rows have MLM targets (half the
  compute, but ITM then trains on masked text). Masking is BERT's whole-word masking
  (:func:`~vitkit.data.text_batches.whole_word_mask`: "t-shirt" is one word, whose pieces would otherwise give
  each other away).
* **WPA.** The IPOT transport distance between the ITM rows' word and patch features
  (:func:`~vitkit.models.vilt.wpa_distance`: text [CLS]/[SEP] and image [CLS] excluded, float32, no autocast)
  is pulled down for matching pairs and pushed up for image-swapped negatives:
  ``(Σ d_pos - Σ d_neg) / (n_pos + n_neg)``, weighted by ``wpa_weight`` (0.1). Hard (swapped-caption) negatives
  take no part: they have exactly the words and patches of a positive, and WPA is blind to order.

**Tokenizer.** It travels inside the model (the ``tokenizer`` constructor argument, so ``config.json`` holds it
and ``from_pretrained`` rebuilds it for ``vitkit eval`` / ``predict`` / a server). A model without one gets
:func:`~vitkit.data.captions.train_tokenizer` on the training captions, which is deterministic, so every DDP rank
(checked) and a resumed run build the same one; a ``model.pretrained`` checkpoint's tokenizer (or a converted HF
folder's ``tokenizer.json``) is kept.

**Evaluation** (seeded, the same pairs at every evaluation): ITM accuracy and loss with half of each batch's pairs
image-swapped, MLM accuracy on seeded whole-word masks, hard-negative accuracy (the true caption scores above its
position-swapped version, two-item captions), image-to-text retrieval R@1 / R@5 among ``retrieval_candidates``
captions per image by ITM score, and the mean WPA distance of matching and non-matching pairs. ``itm_acc`` is the
primary metric: it is the objective's own accuracy, measured on every evaluation pair (the least noisy of the
numbers); the hard-negative and retrieval numbers are reported next to it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.captions import SPECIAL_TOKENS, swapped_caption
from ..data.text_batches import Encoded, draw_itm_pairs, encode_captions, may_match, whole_word_mask  # noqa: F401
from ..errors import CheckpointError, ConfigError, DataError
from ._text import check_same_tokenizer, checkpoint_tokenizer, warn_unknown_words
from .base import Batch, Task, TaskContext, batch_images, build_configured_model, checkpoint_folder, register_task


def _batch_labels(batch: Batch) -> torch.Tensor | None:
    labels = batch.get("labels") if isinstance(batch, dict) else None
    return labels if torch.is_tensor(labels) and labels.ndim == 2 else None


def _captions(batch: Batch) -> list[str]:
    if not isinstance(batch, dict) or "captions" not in batch:
        raise DataError("the vilt task needs caption batches {'images', 'captions'} (fmnist_captions, caption_folder); "
                        f"this dataset yields {type(batch).__name__}")
    return list(batch["captions"])


def _mlm_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(mean cross-entropy over predicted tokens, correct, predicted); a zero that keeps the graph if none."""
    keep = labels != -100
    n = int(keep.sum())
    if n == 0:
        return logits.float().sum() * 0.0, 0, 0
    picked = logits[keep].float()
    loss = F.cross_entropy(picked, labels[keep])
    return loss, int((picked.argmax(-1) == labels[keep]).sum()), n


def _rows(out: dict[str, Any], rows: slice) -> dict[str, Any]:
    return {k: out[k][rows] for k in ("text_feats", "image_feats", "text_masks", "image_masks")}


# ---------------------------------------------------------------------------- the task
@dataclass
class ViLTArgs:
    """``task.args`` of the vilt task (defaults: the paper's ITM + MLM + 0.1 WPA pretraining)."""

    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    wpa_weight: float = 0.1  # the paper's factor on the ITM-WPA loss
    mlm_prob: float = 0.15  # share of the words of a caption that are predicted (whole words)
    swap_prob: float = 0.5  # share of each batch's pairs made negative
    hard_negative_prob: float = 0.0  # share of the negatives that take the position-swapped caption instead
    avoid_false_negatives: bool = True  # with labels, never pair a caption with an image it may describe
    joint_pass: bool = False  # MLM on the ITM rows (masked text, matching rows only) instead of extra clean rows
    beta: float = 0.5  # IPOT proximal step (official 0.5)
    iteration: int = 50  # IPOT outer steps (official 50)
    k: int = 1  # Sinkhorn steps per IPOT step (official 1)
    vocab_size: int | None = None  # tokenizer trained for a model without one (None: the model's vocabulary)
    max_text_len: int | None = None  # tokens per caption incl. [CLS]/[SEP] (None: the model's position table)
    eval_seed: int = 0  # seed of the evaluation swaps, masks and retrieval candidates
    retrieval_images: int = 200  # images per process scored against candidate captions (0: no retrieval)
    retrieval_candidates: int = 20  # captions per image, the true one among them

    def __post_init__(self) -> None:
        checks = {
            "itm_weight": self.itm_weight >= 0, "mlm_weight": self.mlm_weight >= 0, "wpa_weight": self.wpa_weight >= 0,
            "mlm_prob": 0 < self.mlm_prob <= 1, "swap_prob": 0 <= self.swap_prob < 1,
            "hard_negative_prob": 0 <= self.hard_negative_prob <= 1, "beta": self.beta > 0,
            "iteration": self.iteration >= 1, "k": self.k >= 1,
            "vocab_size": self.vocab_size is None or self.vocab_size > len(SPECIAL_TOKENS),
            "max_text_len": self.max_text_len is None or self.max_text_len >= 3,
            "retrieval_images": self.retrieval_images >= 0, "retrieval_candidates": self.retrieval_candidates >= 2,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"task vilt: task.args.{key}={getattr(self, key)!r} is out of range")
        if self.itm_weight + self.mlm_weight + self.wpa_weight == 0:
            raise ConfigError("task vilt: itm_weight, mlm_weight and wpa_weight are all 0; nothing to train")


@register_task
class ViLTTask(Task):
    name = "vilt"
    primary_metric = "itm_acc"
    mode = "max"
    Args = ViLTArgs
    capabilities = frozenset({"retrieve"})

    def __init__(self, args: Any = None, ctx: TaskContext | None = None) -> None:
        super().__init__(args, ctx)
        aug = self.ctx.augment
        if aug is not None and (aug.hflip or aug.mixup_alpha or aug.cutmix_alpha):
            raise ConfigError("task vilt: captions name left and right (and one item per image), so augment.hflip, "
                              "mixup and cutmix would make them false; remove them")
        self.tokenizer: Any = None  # a truncating copy of the model's tokenizer (setup)
        self._source: Any = None  # the model's own tokenizer object that copy was made from

    # ------------------------------------------------------------------ model and tokenizer
    def build_model(self, model_cfg: Any) -> nn.Module:
        """The ViLT with both heads, carrying its tokenizer: the ``model.pretrained`` checkpoint's, else one built
        from the training captions (:func:`~vitkit.data.captions.train_tokenizer`, deterministic)."""
        folder = checkpoint_folder(model_cfg.pretrained) if model_cfg.pretrained else None
        model = build_configured_model(model_cfg)
        if getattr(model, "rank_output", None) is None or getattr(model, "mlm_head", None) is None:
            raise ConfigError(f"task vilt needs a ViLT with its ranking (ITM) and MLM heads; {model_cfg.name!r} is a "
                              f"{type(model).__name__}" + (" without them" if hasattr(model, "rank_output") else ""))
        train_set = self.ctx.train_set
        tok = getattr(model, "tokenizer", None) or (checkpoint_tokenizer(folder) if folder is not None else None)
        if tok is None:
            from ..data.captions import train_tokenizer

            if train_set is None or not hasattr(train_set, "captions"):
                raise ConfigError("task vilt builds its tokenizer from the training captions; the training set has "
                                  "none (use fmnist_captions or caption_folder)")
            try:
                tok = train_tokenizer(list(train_set.captions), self.args.vocab_size or model.vocab_size)
            except DataError as e:
                raise ConfigError(f"task vilt: {e} (task.args.vocab_size)") from None
            check_same_tokenizer(self.ctx, tok)
        try:
            model.set_tokenizer(tok)
        except ValueError as e:
            raise ConfigError(f"task vilt: {e}; raise model.args.vocab_size or lower task.args.vocab_size") from None
        if folder is None and train_set is not None:  # a pretrained ViLT keeps the normalisation it learnt with
            model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(train_set.mean),
                                    "std": tuple(train_set.std)}
        self._load_tokenizer(model)
        return model

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self._load_tokenizer(model)

    def _load_tokenizer(self, model: nn.Module) -> Any:
        """A truncating copy of the model's tokenizer (made once per tokenizer object); sets the special ids."""
        from tokenizers import Tokenizer

        source = getattr(model, "tokenizer", None)
        if source is None:
            raise ConfigError(f"this {type(model).__name__} carries no tokenizer: train it with the vilt task (which "
                              f"stores one), or give it one with model.set_tokenizer(...)")
        if source is self._source:
            return self.tokenizer
        tok = Tokenizer.from_str(source.to_str())
        vocab = tok.get_vocab()
        missing = [t for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if t not in vocab]
        if missing:
            raise CheckpointError(f"the model's tokenizer lacks {missing}; ViLT needs BERT's special tokens")
        size = tok.get_vocab_size()
        specials = {vocab[t] for t in SPECIAL_TOKENS if t in vocab}
        specials |= {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.pad_id, self.mask_id = vocab["[PAD]"], vocab["[MASK]"]
        self.random_ids = torch.tensor([i for i in range(size) if i not in specials], dtype=torch.long)
        if len(self.random_ids) == 0:
            raise CheckpointError("the model's tokenizer has no ordinary tokens")
        self.max_len = min(self.args.max_text_len or model.max_text_len, model.max_text_len)
        self.tokenizer, self._source = tok, source
        return tok

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Captions -> ids, attention mask and word ids (CPU) with the model's tokenizer."""
        return encode_captions(self.tokenizer, texts, self.max_len, self.pad_id)

    # ------------------------------------------------------------------ batches
    def prepare_batch(self, batch: Batch, train: bool) -> Batch:
        """Normalised images; for training also the ITM pairs, the masked captions and their targets."""
        batch = super().prepare_batch(batch, train)
        return self.pretraining_batch(batch) if train else batch

    def pretraining_batch(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Draw the step's negatives and masks (global RNG, so resume is exact; or ``generator``).

        Keys: ``images`` (partners' images for image-swapped rows), ``input_ids``/``attention_mask`` of the ITM
        captions, ``itm_labels`` (1 = matching), ``partner``, ``hard`` (text-swapped rows), ``mlm_input_ids``,
        ``mlm_attention_mask``, ``mlm_labels`` and ``mlm_images`` (None with ``joint_pass``: the ITM rows)."""
        a, device = self.args, self.ctx.device
        images, captions = batch_images(batch), _captions(batch)
        n = len(captions)
        labels = _batch_labels(batch) if a.avoid_false_negatives else None
        matching, partner = draw_itm_pairs(n, a.swap_prob, labels, generator)
        hard = torch.zeros(n, dtype=torch.bool)
        itm_captions = list(captions)
        if a.hard_negative_prob > 0:
            u = torch.rand(n, generator=generator)
            for i in torch.nonzero(~matching & (u < a.hard_negative_prob))[:, 0].tolist():
                swapped = swapped_caption(captions[i])
                if swapped is not None:
                    hard[i], partner[i], itm_captions[i] = True, i, swapped
        itm = self.encode(itm_captions)
        out: dict[str, Any] = {
            "images": images[partner.to(images.device)], "input_ids": itm.input_ids.to(device),
            "attention_mask": itm.attention_mask.to(device), "itm_labels": matching.float().to(device),
            "partner": partner.to(device), "hard": hard.to(device),
        }
        if a.joint_pass:
            masked, mlm_labels = whole_word_mask(itm.input_ids, itm.word_ids, a.mlm_prob, self.mask_id,
                                                 self.random_ids, generator)
            mlm_labels[~matching] = -100  # MLM on clean pairs only
            out.update(input_ids=masked.to(device), mlm_input_ids=None, mlm_attention_mask=None, mlm_images=None)
        else:
            clean = itm if not hard.any() else self.encode(captions)
            masked, mlm_labels = whole_word_mask(clean.input_ids, clean.word_ids, a.mlm_prob, self.mask_id,
                                                 self.random_ids, generator)
            out.update(mlm_input_ids=masked.to(device), mlm_attention_mask=clean.attention_mask.to(device),
                       mlm_images=images)
        out["mlm_labels"] = mlm_labels.to(device)
        return out

    # ------------------------------------------------------------------ training
    def wpa_distance(self, out: dict[str, Any]) -> torch.Tensor:
        """Word-patch OT distance per row, in float32 without autocast as the official code."""
        from ..models.vilt import wpa_distance

        with torch.autocast(out["text_feats"].device.type, enabled=False):
            return wpa_distance(out, self.args.beta, self.args.iteration, self.args.k)

    def wpa_loss(self, out: dict[str, Any], positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """The official ITM-WPA loss before its weight: ``(Σ d_pos - Σ d_neg) / (n_pos + n_neg)``."""
        dist = self.wpa_distance(out)
        used = int(positive.sum()) + int(negative.sum())
        return (dist[positive].sum() - dist[negative].sum()) / max(1, used)

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """ITM + MLM + WPA in one forward call (the MLM rows appended to the ITM rows; DDP needs one call)."""
        a = self.args
        n = int(batch["input_ids"].shape[0])
        ids, att, images = batch["input_ids"], batch["attention_mask"], batch["images"]
        separate = batch["mlm_input_ids"] is not None and a.mlm_weight > 0
        if separate:
            mids, matt = batch["mlm_input_ids"], batch["mlm_attention_mask"]
            width = max(ids.shape[1], mids.shape[1])
            pad = lambda t, v: F.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
            ids = torch.cat([pad(ids, self.pad_id), pad(mids, self.pad_id)])
            att = torch.cat([pad(att, 0), pad(matt, 0)])
            images = torch.cat([images, batch["mlm_images"]])
        out = model(ids, att, None, images)
        labels = batch["itm_labels"]
        logit = out["itm_score"][:n].float()
        itm_loss = F.binary_cross_entropy_with_logits(logit, labels)
        itm_correct = int(((logit > 0).float() == labels).sum())
        mlm_logits = out["mlm_logits"][n:] if separate else out["mlm_logits"][:n]
        mlm_labels = batch["mlm_labels"]
        if mlm_labels.shape[1] < mlm_logits.shape[1]:
            mlm_labels = F.pad(mlm_labels, (0, mlm_logits.shape[1] - mlm_labels.shape[1]), value=-100)
        mlm_loss, mlm_correct, mlm_n = _mlm_stats(mlm_logits, mlm_labels)
        if a.wpa_weight > 0:
            positive = labels > 0.5
            negative = ~positive & ~batch["hard"]
            wpa = self.wpa_loss(_rows(out, slice(0, n)), positive, negative)
        else:
            wpa = logit.sum() * 0.0
        loss = a.itm_weight * itm_loss + a.mlm_weight * mlm_loss + a.wpa_weight * wpa
        # sums over the samples (the trainer divides by count): per-batch means are weighted by the batch size
        stats = {"loss": loss.item() * n, "itm_loss": itm_loss.item() * n, "itm_acc": itm_correct,
                 "mlm_loss": mlm_loss.item() * n, "wpa_loss": wpa.item() * n, "count": n}
        if mlm_n:
            stats["mlm_acc"] = mlm_correct / mlm_n * n
        return loss, stats

    # ------------------------------------------------------------------ evaluation
    def _forward(self, model: nn.Module, images: torch.Tensor, texts: Sequence[str] | Encoded
                 ) -> dict[str, Any]:
        enc = texts if isinstance(texts, Encoded) else self.encode(texts)
        device = images.device
        return model(enc.input_ids.to(device), enc.attention_mask.to(device), None, images)

    def _scores(self, model: nn.Module, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """ITM logits (float32) of ``(images[i], texts[i])`` in chunks of the evaluation batch size."""
        step = max(1, self.ctx.eval_batch_size)
        parts = [self._forward(model, images[i:i + step], texts[i:i + step])["itm_score"].float()
                 for i in range(0, len(texts), step)]
        return torch.cat(parts) if parts else torch.zeros(0, device=images.device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
        """Seeded ITM / MLM / hard-negative / retrieval / WPA numbers over the evaluation set."""
        a = self.args
        self._load_tokenizer(model)
        g = torch.Generator().manual_seed(a.eval_seed + 1_000_003 * self.ctx.rank)
        s = Counter()  # every number below is a sum over this process's pairs
        keep_images: list[torch.Tensor] = []
        keep_labels: list[torch.Tensor] = []
        pool: list[str] = []
        pool_labels: list[torch.Tensor] = []
        for batch in batches:
            images, captions = batch_images(batch), _captions(batch)
            n = len(captions)
            if n == 0:
                continue
            labels = _batch_labels(batch)
            # ITM: the true pairs, then seeded image-swapped negatives
            matching, partner = draw_itm_pairs(n, 0.5, labels if a.avoid_false_negatives else None, g)
            clean = self.encode(captions)
            pos_out = self._forward(model, images, clean)
            pos = pos_out["itm_score"].float()
            neg_rows = torch.nonzero(~matching)[:, 0]
            pos_rows = torch.nonzero(matching)[:, 0].to(images.device)
            logits = [pos[pos_rows]]
            targets = [torch.ones(len(pos_rows), device=images.device)]
            if len(neg_rows):
                sub = Encoded(*(t[neg_rows] for t in (clean.input_ids, clean.attention_mask, clean.word_ids)))
                neg_out = self._forward(model, images[partner[neg_rows].to(images.device)], sub)
                logits.append(neg_out["itm_score"].float())
                targets.append(torch.zeros(len(neg_rows), device=images.device))
                s["wpa_neg"] += float(self.wpa_distance(neg_out).sum())
                s["wpa_neg_n"] += len(neg_rows)
            s["wpa_pos"] += float(self.wpa_distance(pos_out).sum())
            s["wpa_pos_n"] += n
            logit, target = torch.cat(logits), torch.cat(targets)
            s["itm_correct"] += int(((logit > 0).float() == target).sum())
            s["itm_loss"] += float(F.binary_cross_entropy_with_logits(logit, target, reduction="sum"))
            s["itm_n"] += len(target)
            # MLM on seeded whole-word masks, with the true images
            masked, mlm_labels = whole_word_mask(clean.input_ids, clean.word_ids, a.mlm_prob, self.mask_id,
                                                 self.random_ids, g)
            mlm_logits = self._forward(model, images, Encoded(masked, clean.attention_mask, clean.word_ids))
            mlm_loss, correct, count = _mlm_stats(mlm_logits["mlm_logits"], mlm_labels.to(images.device))
            s["mlm_correct"] += correct
            s["mlm_loss"] += float(mlm_loss) * count
            s["mlm_n"] += count
            # hard negatives: the true caption against its position-swapped version
            swapped = [(i, swapped_caption(c)) for i, c in enumerate(captions)]
            swapped = [(i, c) for i, c in swapped if c is not None]
            if swapped:
                rows = torch.tensor([i for i, _ in swapped], device=images.device)
                hard = self._scores(model, images[rows], [c for _, c in swapped])
                true = pos[rows]  # a tie (frequent under bf16 before training) counts as half a success
                s["hard_correct"] += float((true > hard).sum()) + 0.5 * float((true == hard).sum())
                s["hard_n"] += len(swapped)
            # retrieval material: the first images of this process, every caption as a candidate
            room = a.retrieval_images - sum(len(x) for x in keep_images)
            if room > 0:
                keep_images.append(images[:room])
                if labels is not None:
                    keep_labels.append(labels[:room].cpu())
            pool += captions
            if labels is not None:
                pool_labels.append(labels.cpu())
        if keep_images:
            r = self._retrieval(model, torch.cat(keep_images), pool,
                                torch.cat(pool_labels) if len(pool_labels) and keep_labels else None, g)
            s.update(r)
        keys = ["itm_correct", "itm_n", "itm_loss", "mlm_correct", "mlm_n", "mlm_loss", "hard_correct", "hard_n",
                "r1", "r5", "r_n", "wpa_pos", "wpa_pos_n", "wpa_neg", "wpa_neg_n"]
        device = self.ctx.device
        total = self.ctx.all_reduce_sum(torch.tensor([float(s[k]) for k in keys], dtype=torch.float64,
                                                     device=device)).cpu().tolist()
        t = dict(zip(keys, total))
        metrics: dict[str, Any] = {"itm_acc": t["itm_correct"] / max(1.0, t["itm_n"]),
                                   "itm_loss": t["itm_loss"] / max(1.0, t["itm_n"]), "count": int(t["wpa_pos_n"])}
        if t["mlm_n"]:
            metrics.update(mlm_acc=t["mlm_correct"] / t["mlm_n"], mlm_loss=t["mlm_loss"] / t["mlm_n"])
        if t["hard_n"]:
            metrics.update(hard_neg_acc=t["hard_correct"] / t["hard_n"], hard_neg_count=int(t["hard_n"]))
        if t["r_n"]:
            metrics["retrieval_r1"] = t["r1"] / t["r_n"]
            if a.retrieval_candidates >= 5:
                metrics["retrieval_r5"] = t["r5"] / t["r_n"]
            metrics["retrieval_count"] = int(t["r_n"])
        if t["wpa_pos_n"]:
            metrics["wpa_pos"] = t["wpa_pos"] / t["wpa_pos_n"]
        if t["wpa_neg_n"]:
            metrics["wpa_neg"] = t["wpa_neg"] / t["wpa_neg_n"]
        return metrics

    def _retrieval(self, model: nn.Module, images: torch.Tensor, pool: list[str], pool_labels: torch.Tensor | None,
                   g: torch.Generator) -> Counter:
        """Image -> text R@1 / R@5: each image's own caption (``pool[i]``) against ``K - 1`` seeded other captions
        of the pool that cannot describe it (other text, and by the labels not naming only its items); ties with
        the true caption's score count as broken at random (expected hits)."""
        K = self.args.retrieval_candidates
        texts: list[str] = []
        rows: list[int] = []
        for i in range(len(images)):
            ok = torch.tensor([c != pool[i] for c in pool])
            if pool_labels is not None:
                ok &= ~may_match(pool_labels, pool_labels[i:i + 1])[:, 0]
            others = torch.nonzero(ok)[:, 0]
            if len(others) == 0:
                continue
            pick = others[torch.randperm(len(others), generator=g)[:K - 1]]
            texts += [pool[i], *(pool[j] for j in pick.tolist())]
            rows += [i] * (1 + len(pick))
        s: Counter = Counter()
        if not rows:
            return s
        index = torch.tensor(rows, device=images.device)
        scores = self._scores(model, images[index], texts).cpu()
        start = 0
        for i in sorted(set(rows)):
            m = rows.count(i)
            block = scores[start:start + m]
            # ties are broken at random, in expectation: the true caption is equally likely at each tied place
            above, tied = int((block[1:] > block[0]).sum()), int((block[1:] == block[0]).sum())
            s["r1"] += min(1.0, max(0.0, (1 - above) / (tied + 1)))
            s["r5"] += min(1.0, max(0.0, (5 - above) / (tied + 1)))
            s["r_n"] += 1
            start += m
        return s

    def format_report(self, metrics: dict[str, Any]) -> str:
        pct = lambda k: f"{100 * metrics[k]:.2f}%"  # noqa: E731
        lines = [f"ITM accuracy {pct('itm_acc')} (half of the pairs image-swapped), loss {metrics['itm_loss']:.4f}   "
                 f"({metrics['count']} images)"]
        if "mlm_acc" in metrics:
            lines.append(f"MLM accuracy {pct('mlm_acc')} on whole-word masks, loss {metrics['mlm_loss']:.4f}")
        if "hard_neg_acc" in metrics:
            lines.append(f"hard negatives (positions swapped) rejected {pct('hard_neg_acc')} "
                         f"({metrics['hard_neg_count']} two-item captions)")
        if "retrieval_r1" in metrics:
            lines.append(f"image->text retrieval among {self.args.retrieval_candidates} captions: R@1 "
                         f"{pct('retrieval_r1')}" + (f", R@5 {pct('retrieval_r5')}" if "retrieval_r5" in metrics
                                                    else "") + f" ({metrics['retrieval_count']} images)")
        if "wpa_pos" in metrics:
            lines.append(f"word-patch OT distance: matching {metrics['wpa_pos']:.4f}"
                         + (f", non-matching {metrics['wpa_neg']:.4f}" if "wpa_neg" in metrics else ""))
        return "\n".join(lines)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, captions: Sequence[str] | Sequence[Sequence[str]]
                | None = None, topk: int = 5, **kw: Any) -> list[dict[str, Any]]:
        """Per image, its candidate captions ranked by ITM score (logit and sigmoid probability).

        ``captions``: one list for every image, or one list per image. ViLT scores pairs, so there is nothing to
        predict from an image alone.
        """
        if captions is None or isinstance(captions, str) or len(captions) == 0:
            raise ConfigError("the vilt task scores (image, caption) pairs: pass captions=[...] (one list for all "
                              "images, or one list per image); it cannot predict from an image alone")
        self._load_tokenizer(model)
        per_image = ([list(c) for c in captions] if all(not isinstance(c, str) for c in captions)
                     else [list(captions)] * len(images))
        if len(per_image) != len(images):
            raise ConfigError(f"{len(per_image)} caption lists for {len(images)} images")
        rows = [i for i, caps in enumerate(per_image) for _ in caps]
        texts = [c for caps in per_image for c in caps]
        scores = self._scores(model, images[torch.tensor(rows, dtype=torch.long, device=images.device)], texts)
        results, start = [], 0
        for caps in per_image:
            block = scores[start:start + len(caps)].cpu().tolist()
            start += len(caps)
            ranked = sorted(zip(caps, block), key=lambda cs: -cs[1])[:max(1, topk)]
            results.append({"captions": [{"caption": c, "score": v, "prob": 1 / (1 + math.exp(-v))}
                                         for c, v in ranked], "best": ranked[0][0] if ranked else None})
        return results

    # ------------------------------------------------------------------ tools
    @torch.no_grad()
    def retrieval_scores(self, model: nn.Module, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """The ITM logit of every (image, text) pair, one joint pass each (images x texts)."""
        self._load_tokenizer(model)
        warn_unknown_words(self.tokenizer, texts, "retrieval texts")
        return torch.stack([self._scores(model, images[i:i + 1].expand(len(texts), -1, -1, -1), list(texts))
                            for i in range(len(images))])
