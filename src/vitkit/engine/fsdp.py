"""``train.strategy: fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) per transformer block, activation
checkpointing, and sharded checkpoints with ``torch.distributed.checkpoint`` (DCP) that another process count
can resume.

Sharding units. A model names its units with a ``fsdp_units()`` method, or the class names of its units in
``_no_split_modules`` (the Hugging Face convention); otherwise every module whose class name ends in ``Block`` and
that is an element of an ``nn.ModuleList`` / ``nn.Sequential`` is one (the outermost such module: a block inside
a block is not sharded on its own). The root module is sharded last and holds everything else (embeddings,
final norm, head). The same units are what activation checkpointing recomputes.

Checkpoint layout (a folder like every vitkit checkpoint, swapped in atomically by :mod:`.checkpoint`):
``config.json`` + ``model.safetensors`` (the consolidated weights, gathered on rank 0, so eval, export and serve
read it as before), ``train_state.pt`` (counters, schedules, RNG, the optimizers' non-tensor settings) and
``sharded/``: a DCP folder with the model and the optimizers' tensor state, keyed by parameter name, so any
process count re-shards it on load. Only tensors go into ``sharded/``, and its ``.metadata`` (a pickle) is read
by an unpickler that builds nothing but DCP's own metadata classes, so a checkpoint cannot execute code.
"""

from __future__ import annotations

import pickle
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .checkpoint import new_temporary, remove_stale, write_checkpoint
from .distributed import DistInfo, barrier, broadcast_object

SHARDS = "sharded"  # the DCP folder inside a checkpoint


# ------------------------------------------------------------------------------------------------ units
def block_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded (and checkpointed) one by one; see the module's docstring for the rule."""
    own = getattr(model, "fsdp_units", None)
    if callable(own):
        return list(own())
    named = set(getattr(model, "_no_split_modules", None) or ())
    in_list = {id(child) for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))
               for child in m.children()}
    units: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if module is model or any(name.startswith(prefix) for prefix in taken):
            continue
        kind = type(module).__name__
        if (kind in named) if named else (id(module) in in_list and kind.endswith("Block")):
            units.append(module)
            taken.append(name + ".")
    return units


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every unit's activations in backward (``torch.distributed._composable.checkpoint``: the
    parameter names stay as they are, so optimizer groups and checkpoints do not change); returns the count."""
    from torch.distributed._composable import checkpoint

    units = block_units(model)
    for unit in units:
        checkpoint(unit)  # non-reentrant, RNG state preserved: dropout and drop-path recompute identically
    return len(units)


def prepare_model(model: nn.Module, strategy: str, activation_checkpointing: bool, info: DistInfo,
                  bf16: bool) -> int:
    """Activation checkpointing, then (``fsdp`` with several processes) sharding; call before the optimizers
    are built (sharding replaces the parameters). Returns the number of units. With one process ``fsdp`` trains
    the plain model and still writes sharded checkpoints, so any process count can resume them."""
    units = apply_activation_checkpointing(model) if activation_checkpointing else len(block_units(model))
    if strategy == "fsdp" and info.enabled:
        shard_model(model, info, bf16)
    return units


def shard_model(model: nn.Module, info: DistInfo, bf16: bool) -> nn.Module:
    """``fully_shard`` every unit (resharded after forward), then the root (kept gathered after forward: its
    parameters are needed again at once in backward). bf16 all-gathers bf16 parameters and reduces gradients
    in fp32; the optimizer keeps fp32 shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for unit in block_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(_fsdp_modules(model))


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every parameter gathered on every process for the duration (collective on entry; a no-op for an
    unsharded model): forward passes then need no communication, so processes may evaluate different numbers
    of batches and rank 0 alone may draw pictures. Costs a full copy of the parameters (no gradients, no
    optimizer state) per process."""
    units = _fsdp_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # as shard_model set them


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(params: Iterable[torch.Tensor], info: DistInfo) -> bool:
    """Whether every parameter is finite; with sharded parameters each process checks its shard and all agree
    (every process must call it then). Replicated (DDP) parameters need no communication."""
    params = list(params)
    sharded = any(hasattr(p, "to_local") for p in params)
    ok = all(bool(torch.isfinite(_local(p)).all()) for p in params)
    if sharded and info.enabled:
        import torch.distributed as dist

        flag = torch.tensor([0.0 if ok else 1.0], device=info.device)
        dist.all_reduce(flag)
        ok = flag.item() == 0
    return ok


# ------------------------------------------------------------------------------------------------ checkpoints
def _plain_class(model: nn.Module) -> type:
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


class _Consolidated:
    """What :func:`.checkpoint.write_checkpoint` saves as the model: the gathered weights and the config of the
    model's own class (sharding subclasses it as ``FSDP<Class>``)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.model, self.state = model, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def config(self) -> dict[str, Any]:
        cfg = self.model.config()
        cfg["model_class"] = _plain_class(self.model).__name__
        return cfg

    def save_pretrained(self, directory: str | Path) -> None:
        from ..models import save_pretrained

        save_pretrained(self, directory)  # type: ignore[arg-type] - needs state_dict() and config() only


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated weights on rank 0 (CPU), empty elsewhere; collective for a sharded model."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _split(tree: Any) -> tuple[Any, Any]:
    """(tensors, everything else) of a nested dict: DCP gets only tensors, ``train_state.pt`` the rest."""
    if isinstance(tree, torch.Tensor):
        return tree, None
    if isinstance(tree, dict):
        tensors, rest = {}, {}
        for k, v in tree.items():
            t, r = _split(v)
            if t is not None and (not isinstance(t, dict) or t):
                tensors[k] = t
            if r is not None and (not isinstance(r, dict) or r or not t):  # an empty dict stays a dict
                rest[k] = r
        return tensors, rest
    return None, tree


def _merge(tensors: Any, rest: Any) -> Any:
    if not isinstance(tensors, dict) or not isinstance(rest, dict):
        return tensors if tensors is not None else rest
    return {k: _merge(tensors.get(k), rest.get(k)) for k in {*tensors, *rest}}


def _quiet_dcp(call, *args, **kwargs):
    """DCP warns that one process saves 'in a single process': that is what it is meant to do here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        return call(*args, **kwargs)


def save_sharded(folder: Path, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer] | None,
                 train_state: dict[str, Any] | None, extra_files: dict[str, str], info: DistInfo) -> Path | None:
    """Write a checkpoint with every process (collective): the DCP shards (with ``optimizers``), then rank 0 the
    consolidated weights, ``train_state.pt`` and the marker, and swaps it in. Returns the folder on rank 0."""
    tmp = broadcast_object(str(new_temporary(folder)) if info.is_main else None, info)
    tmp = Path(tmp)
    try:
        if optimizers is not None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            tensors: dict[str, Any] = {"model": get_model_state_dict(model), "optimizers": {}}
            settings = {}
            for name, opt in optimizers.items():
                tensors["optimizers"][name], settings[name] = _split(get_optimizer_state_dict(model, opt))
            _quiet_dcp(dcp.save, tensors, checkpoint_id=tmp / SHARDS)
            train_state = {**(train_state or {}), "optimizers": settings, "strategy": "fsdp"}
        weights = full_state_dict(model)
        barrier(info)  # every shard is on disk before rank 0 seals the folder
    except BaseException:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not info.is_main:
        return None
    path = write_checkpoint(folder, _Consolidated(model, weights), train_state, None, extra_files, tmp=tmp)
    remove_stale(Path(folder).parent)
    return path


def has_shards(folder: Path) -> bool:
    return (Path(folder) / SHARDS / ".metadata").is_file()


def check_strategy(folder: Path, strategy: str) -> None:
    """One line when a checkpoint's kind and ``train.strategy`` disagree."""
    sharded = has_shards(folder)
    if strategy == "fsdp" and not sharded:
        raise CheckpointError(f"{folder} has no {SHARDS}/ folder: it was written with train.strategy=ddp; resume it "
                              "with train.strategy=ddp (or start a run from its weights with model.pretrained)")
    if strategy != "fsdp" and sharded:
        raise CheckpointError(f"{folder} is a sharded checkpoint (train.strategy=fsdp); resume it with "
                              "--set train.strategy=fsdp, with any number of processes")


def load_sharded(folder: Path, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                 train_state: dict[str, Any]) -> None:
    """Load the DCP shards of ``folder`` into ``model`` and ``optimizers`` (every process; any process count,
    sharded or not: DCP re-shards by parameter name)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    settings = train_state.get("optimizers") or {}
    if set(settings) != set(optimizers):
        raise CheckpointError(f"{folder} holds optimizers {sorted(settings)}, the task builds {sorted(optimizers)}")
    target: dict[str, Any] = {"model": get_model_state_dict(model), "optimizers": {}}
    for name, opt in optimizers.items():
        target["optimizers"][name] = _split(get_optimizer_state_dict(model, opt))[0]
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        _quiet_dcp(dcp.load, target, storage_reader=_safe_reader(Path(folder) / SHARDS))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        failures = [f[0] for f in getattr(e, "failures", {}).values()]  # DCP wraps each rank's failure
        own = next((f for f in failures if isinstance(f, CheckpointError)), None)
        if own is not None:
            raise CheckpointError(str(own)) from None
        cause = failures[0] if failures else e
        text = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        raise CheckpointError(f"cannot load the sharded state in {Path(folder) / SHARDS} (a checkpoint of another "
                              f"model or optimizer?): {text}") from None
    set_model_state_dict(model, target["model"])
    for name, opt in optimizers.items():
        set_optimizer_state_dict(model, opt, _merge(target["optimizers"][name], settings[name]))


# ------------------------------------------------------------------------------------------------ safe reading
def _allowed(module: str, name: str) -> bool:
    if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
        return not name.startswith("__")
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise CheckpointError(f"refusing to load {module}.{name}: a DCP .metadata file holds checkpoint "
                                  "metadata only")
        return super().find_class(module, name)


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    class SafeReader(FileSystemReader):
        """DCP's file reader with ``.metadata`` read by an allow-list unpickler, and tensors only: a bytes
        entry would be read with ``torch.load(weights_only=False)``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            path = Path(self.path) / ".metadata"
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
            except Exception as e:  # noqa: BLE001 - a broken pickle raises many types
                raise CheckpointError(f"{path} is not DCP metadata: {type(e).__name__}: {e}") from None
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{path} is not DCP metadata (a {type(metadata).__name__})")
            bad = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
            if bad:
                raise CheckpointError(f"{path} lists non-tensor entries ({', '.join(bad[:3])}); vitkit writes "
                                      "tensors only")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _safe_reader(path: Path):
    """A :class:`SafeReader` for ``path`` (the class is built on first use: DCP is imported lazily)."""
    return _reader_class()(path)
