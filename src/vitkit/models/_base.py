"""What every vitkit model shares: recorded constructor arguments, ``save_pretrained`` and attention maps.

A subclass's constructor arguments are captured automatically (after ``__init__`` returns), so
``save_pretrained`` can write a ``config.json`` that rebuilds exactly the same architecture. Keep
constructor arguments JSON-friendly: numbers, strings, booleans, lists, None.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from .._version import __version__
from ..layers.attention import capture_attention
from ..layers.text import tokenizer_json
from ._pretrained import save_pretrained
from ._registry import from_pretrained, register_class


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"model constructor argument {value!r} is not JSON-serialisable; pass names, not objects")


class VitkitModel(nn.Module):
    """Base class of all vitkit models."""

    model_args: dict[str, Any]
    model_name: str | None = None
    # Parameter-name prefixes of the task head; a checkpoint whose head does not fit is loaded without it.
    head_prefixes: tuple[str, ...] = ("head.",)
    # Models that pretrain a backbone (MAE, contrastive) name its submodule prefix, e.g. "encoder.": their
    # checkpoints then give just the backbone to a model of another class (see models.load_backbone).
    backbone_prefix: str | None = None
    # The task (vitkit.tasks) a checkpoint is used with when it records none (a converted checkpoint).
    default_task: str = "classify"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register_class(cls)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            recorded = {}
            for name, value in list(bound.arguments.items())[1:]:
                param = signature.parameters[name]
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
                    recorded[name] = value
            # The outermost class runs last, so its (complete) argument set wins.
            self.model_args = _jsonable(recorded)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    # ----------------------------------------------------------------- metadata
    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Data-side metadata: input size, normalisation stats, class names (timm's ``default_cfg``)."""
        cfg = self.__dict__.setdefault("_pretrained_cfg", {})
        return cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: dict[str, Any]) -> None:
        self.__dict__["_pretrained_cfg"] = dict(value)

    default_cfg = pretrained_cfg

    def config(self) -> dict[str, Any]:
        """What ``config.json`` holds: enough to rebuild the model and to preprocess its inputs."""
        cfg = {
            "vitkit_version": __version__,
            "model_class": type(self).__name__,
            "model_name": self.model_name,
            "model_args": self.model_args,
            "pretrained_cfg": _jsonable(self.pretrained_cfg),
        }
        if self.backbone_prefix:
            backbone = self.get_submodule(self.backbone_prefix.rstrip("."))
            cfg["backbone"] = {"prefix": self.backbone_prefix, "model_class": type(backbone).__name__,
                               "model_args": getattr(backbone, "model_args", {})}
        return cfg

    # ----------------------------------------------------------------- I/O
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (both atomically) into ``directory``."""
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> VitkitModel:
        model = from_pretrained(path, **overrides)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    # ----------------------------------------------------------------- introspection
    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, **forward_kwargs: Any) -> list[torch.Tensor]:
        """Run one forward pass and return every attention layer's probabilities, in execution order.

        Each map is (B, heads, N_query, N_key). For ViT, N includes the CLS token at index 0.
        """
        with capture_attention(self) as maps:
            self(x, **forward_kwargs)
        return maps

    def adapt_backbone_state(self, state: dict[str, torch.Tensor], backbone: dict[str, Any]
                             ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Complete a backbone's weights for this model before they are loaded (see ``models.load_backbone``).

        ``backbone`` is the checkpoint's description of it (``model_class``, ``model_args``). Returns the state
        and notes for the load message. The default changes nothing; ViT fills a learned position table from
        a backbone's fixed sin-cos positions.
        """
        return state, []

    def new_head(self, num_classes: int, class_names: list[str] | None = None) -> nn.Module:
        """A fresh Linear head (trunc-normal std 0.02, zero bias; Identity for 0 classes) for ``reset_classifier``;
        records the class count and the class names (or drops names that belonged to the old head)."""
        check_model_args(num_classes, {}, {})
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.model_args["num_classes"] = num_classes
        cfg = {k: v for k, v in self.pretrained_cfg.items() if k != "class_names"}
        if class_names is not None:
            cfg["class_names"] = list(class_names)
        self.pretrained_cfg = cfg
        if num_classes == 0:
            return nn.Identity()
        weight = next(self.parameters())
        head = nn.Linear(self.num_features, num_classes).to(device=weight.device, dtype=weight.dtype)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def no_weight_decay(self) -> set[str]:
        """Parameter names that must not be weight-decayed besides norms and biases (tokens, tables)."""
        return set()

    def lr_layer_id(self, name: str) -> int:
        """Depth index of a parameter for layer-wise LR decay; 0 = input side, ``num_lr_layers - 1`` = head."""
        return 0

    @property
    def num_lr_layers(self) -> int:
        return 1


POOL_TYPES = ("cls", "gap", "none")


def check_model_args(num_classes: int, positive: dict[str, Any], rates: dict[str, float]) -> None:
    """Reject sizes a constructor would otherwise accept silently (``num_classes=-1`` builds no head at all).

    ``num_classes`` may be 0 (a headless feature extractor); every entry of ``positive`` must be >= 1 (or > 0
    for floats such as ``mlp_ratio``); every rate must be in [0, 1).
    """
    bad = [] if isinstance(num_classes, int) and num_classes >= 0 else [
        f"num_classes={num_classes!r} (must be >= 0; 0 builds no classifier head)"]
    for name, value in positive.items():
        values = value if isinstance(value, (tuple, list)) and len(value) == 2 else [value]  # sizes may be pairs
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
            bad.append(f"{name}={value!r} (must be > 0)")
    bad += [f"{name}={value!r} (must be in [0, 1))" for name, value in rates.items()
            if not (isinstance(value, (int, float)) and 0 <= value < 1)]
    if bad:
        raise ValueError("invalid model argument(s): " + ", ".join(bad))


def check_pool(pool: str, class_token: bool) -> None:
    if pool not in POOL_TYPES:
        raise ValueError(f"pool must be one of {POOL_TYPES}, got {pool!r}")
    if pool == "cls" and not class_token:
        raise ValueError("pool='cls' needs class_token=True; use pool='gap' without a CLS token")


def select_blocks(indices: int | list[int] | tuple[int, ...] | None, depth: int, what: str = "model") -> list[int]:
    """Block indices for ``forward_intermediates``: None = all, n = the last n, a list = those (negative from the
    end). An index outside the model is an error, never silently wrapped around to another block."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, bool) or not isinstance(indices, (int, list, tuple)):
        raise ValueError(f"indices must be None, an int or a list of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 1 <= indices <= depth:
            raise ValueError(f"indices={indices}: {what} has {depth} blocks, so the last n needs 1 <= n <= {depth}")
        return list(range(depth - indices, depth))
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth]
    if bad or not indices:
        raise ValueError(f"indices={list(indices)}: {what} has {depth} blocks (valid indices {-depth}..{depth - 1})")
    return sorted({i % depth for i in indices})


def stage_intermediates(model: nn.Module, x: torch.Tensor, indices: Any, output_fmt: str,
                        intermediates_only: bool) -> Any:
    """``forward_intermediates`` of a convolutional family whose ``_run_stages(x, take, stop)`` returns the last
    map and the maps of the stages in ``take`` (stage 0 = the stem), stopping after ``stop`` when given."""
    take = select_blocks(indices, model.num_stages, f"{type(model).__name__} (stages)")
    if output_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
    x, collected = model._run_stages(x, set(take), max(take) if intermediates_only else None)
    if output_fmt == "NHWC":
        collected = [m.permute(0, 2, 3, 1) for m in collected]
    return collected if intermediates_only else (x, collected)

class TokenizerMixin:
    """A text model that may carry the ``tokenizers`` tokenizer it was trained with (CLIP, ViLT).

    The tokenizer is the constructor argument ``tokenizer`` (its JSON object), so ``config.json`` holds it with
    the other arguments and a checkpoint's token ids keep their meaning. The constructor ends with
    ``self._init_tokenizer(tokenizer)``; :meth:`_check_tokenizer` adds a model's own checks.
    """

    vocab_size: int
    model_args: dict[str, Any]
    _tokenizer: Any = None

    def _init_tokenizer(self, tokenizer: dict[str, Any] | str | None) -> None:
        self._tokenizer = None if tokenizer is None else self._checked_tokenizer(tokenizer_json(tokenizer))

    @property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` this model was trained with (None when it carries none, e.g. converted
        checkpoints, whose tokenizer files lie beside them: ``vitkit.convert.load_tokenizer``)."""
        return self._tokenizer

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Carry ``tokenizer`` (a ``tokenizers.Tokenizer`` or its JSON) from now on, also in saved checkpoints."""
        data = tokenizer_json(tokenizer)
        self._tokenizer = self._checked_tokenizer(data)
        self.model_args["tokenizer"] = data

    def _checked_tokenizer(self, data: dict[str, Any]) -> Any:
        """Parse a tokenizer; refuse one whose ids would fall outside the word-embedding table, or that fails
        :meth:`_check_tokenizer`."""
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(json.dumps(data))
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise ValueError(f"tokenizer: not a readable tokenizers JSON ({e})") from None
        if tok.get_vocab_size() > self.vocab_size:
            raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens, the model's vocab_size is "
                             f"{self.vocab_size}")
        self._check_tokenizer(tok)
        return tok

    def _check_tokenizer(self, tok: Any) -> None:
        """A model's own checks of a parsed tokenizer (raise ValueError); none by default."""


class EncoderWrapper(VitkitModel):
    """A pretraining model built around a vitkit encoder at ``self.encoder`` (MAE, contrastive).

    The encoder is the backbone a classifier takes over (``backbone_prefix``); optimiser metadata follows the
    encoder's depth, and everything outside it (decoder, projector) counts as the top layer for layer decay.
    """

    backbone_prefix = "encoder."
    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {self.backbone_prefix + n for n in self.encoder.no_weight_decay()}

    @property
    def num_lr_layers(self) -> int:
        return self.encoder.num_lr_layers

    def lr_layer_id(self, name: str) -> int:
        if name.startswith(self.backbone_prefix):
            return self.encoder.lr_layer_id(name[len(self.backbone_prefix):])
        return self.num_lr_layers - 1


class TokenClassifier(VitkitModel):
    """The classifier interface of isotropic token models (ViT, T2T-ViT, ...), written once.

    The forward pass is two public steps with one place in between where tokens may be dropped::

        tokens, grid = model.embed_tokens(images)   # patches + prefix tokens + input positions + dropout
        tokens = tokens[:, keep]                     # optional: MAE masking, token pruning, ...
        tokens, _ = model.run_blocks(tokens, grid)   # the transformer blocks
        feats = model.norm(tokens)

    A subclass provides ``embed_tokens``, ``blocks``, ``norm``, ``head``, ``pre_logits``, ``head_drop``,
    ``cls_token`` (or None), ``pool`` and ``num_prefix_tokens``. One whose positions enter inside the blocks
    (per-block tables, relative attention biases) overrides ``_block_inputs`` and ``_token_drop_blocker``,
    so that dropping tokens is refused with a clear error rather than mis-indexing position tables.
    """

    grad_checkpointing = False
    # parameter-name prefixes that belong to the input side (layer 0 of layer-wise LR decay)
    stem_prefixes: tuple[str, ...] = ("cls_token", "patch_embed.", "pos_embed.")
    # parameter-name prefixes indexed like blocks ("<prefix><i>.") that belong to block i
    per_block_prefixes: tuple[str, ...] = ("blocks.",)

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) images -> ((B, prefix + h*w, D) tokens, (h, w) grid), input positions added.

        Prefix tokens (CLS) come first. After this call tokens may be dropped or reordered along dim 1 (if
        :attr:`supports_token_dropping`) before :meth:`run_blocks`.
        """
        raise NotImplementedError

    def input_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype of the model's weights: an fp16/bf16 batch for an fp32 model (or the reverse) is
        cast instead of failing deep inside a convolution; under autocast the layers still pick their own."""
        weight = next(self.parameters(), None)
        return x if weight is None or x.dtype == weight.dtype else x.to(weight.dtype)

    def _block_inputs(self, i: int, x: torch.Tensor, grid: tuple[int, int], cache: dict
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens entering block ``i`` and its attention bias; ``cache`` lives for one forward pass.

        The hook for position information injected per block; the default injects nothing.
        """
        return x, None

    def _token_drop_blocker(self) -> str | None:
        """Why tokens cannot be dropped between ``embed_tokens`` and ``run_blocks`` (None when they can)."""
        return None

    @property
    def supports_token_dropping(self) -> bool:
        """True when tokens may be dropped after :meth:`embed_tokens` (all position information is in them)."""
        return self._token_drop_blocker() is None

    def check_token_dropping(self) -> None:
        """Raise a ValueError saying why this model cannot run on a subset of its tokens, if it cannot."""
        reason = self._token_drop_blocker()
        if reason is not None:
            raise ValueError(f"{type(self).__name__} cannot drop tokens after embed_tokens (MAE masking, token "
                             f"pruning): {reason}")

    def run_blocks(self, x: torch.Tensor, grid: tuple[int, int], collect: set[int] | frozenset[int] = frozenset(),
                   stop_after: int | None = None, last_queries: slice | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks on tokens from :meth:`embed_tokens` (possibly a subset of them).

        Returns the final tokens and the outputs of the blocks whose indices are in ``collect``; stops after
        block ``stop_after`` if given. ``last_queries`` computes the last block for those query tokens only
        (keys and values stay complete), e.g. ``slice(0, 1)`` when only the CLS token is read afterwards.
        """
        if x.shape[1] != self.num_prefix_tokens + grid[0] * grid[1]:
            self.check_token_dropping()
        cache: dict = {}
        collected = []
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x, bias = self._block_inputs(i, x, grid, cache)
            if i == last and last_queries is not None:
                x = blk(x, bias, queries=last_queries)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, bias, use_reentrant=False)
            else:
                x = blk(x, bias)
            if i in collect:
                collected.append(x)
            if stop_after is not None and i >= stop_after:
                break
        return x, collected

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, prefix + patch tokens, D) normalised tokens."""
        x, grid = self.embed_tokens(x)
        x, _ = self.run_blocks(x, grid)
        return self.norm(x)

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            return x[:, 0]
        if self.pool == "gap":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> pooled features (``pre_logits=True``) or class logits."""
        x = self.head_drop(self.pre_logits(self.pool_tokens(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ):
        """Per-block feature maps for dense tasks.

        ``indices``: None = every block, an int n = the last n blocks, a list = those blocks (negative counts
        from the end). Maps are (B, D, h, w) for ``NCHW`` or (B, h, w, D) for ``NHWC``. Returns the list, or
        ``(final_normed_tokens, list)`` unless ``intermediates_only``. With ``return_prefix_tokens`` each entry
        is a pair (map, prefix tokens).
        """
        take = select_blocks(indices, len(self.blocks), type(self).__name__)
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        tokens, grid = self.embed_tokens(x)
        tokens, collected = self.run_blocks(tokens, grid, set(take), max(take) if intermediates_only else None)
        outputs = []
        for out in collected:
            out = self.norm(out) if norm else out
            prefix, patches = out[:, :self.num_prefix_tokens], out[:, self.num_prefix_tokens:]
            fmap = patches.reshape(out.shape[0], grid[0], grid[1], -1)
            if output_fmt == "NCHW":
                fmap = fmap.permute(0, 3, 1, 2)
            outputs.append((fmap, prefix) if return_prefix_tokens else fmap)
        return outputs if intermediates_only else (self.norm(tokens), outputs)

    def reset_classifier(self, num_classes: int, pool: str | None = None,
                         class_names: list[str] | None = None) -> None:
        """Replace the head (e.g. for fine-tuning on another label set)."""
        check_model_args(num_classes, {}, {})
        if pool is not None:
            check_pool(pool, self.cls_token is not None)
            self.pool = pool
            self.model_args["pool"] = pool
        self.head = self.new_head(num_classes, class_names)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward: less memory, about a third more compute."""
        self.grad_checkpointing = enable

    @property
    def num_lr_layers(self) -> int:
        return len(self.blocks) + 2

    def lr_layer_id(self, name: str) -> int:
        if name.startswith(self.stem_prefixes):
            return 0
        if name.startswith(self.per_block_prefixes):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1
