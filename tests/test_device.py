"""``train.device``: what ``auto`` picks, the one-line error for ``cuda`` without a GPU, autocast per device, DataLoader
settings per device, and a forward/backward step of every model family through the trainer's device helpers, on the
meta device (shapes only) or the CPU. Tests marked ``cuda`` train on a GPU and are skipped without one."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from _tiny import call, is_classifier, tiny
from vitkit.cli import main as cli_main
from vitkit.engine import Trainer, load_config, train
from vitkit.engine.distributed import autocast_dtype, loader_settings, resolve_device
from vitkit.errors import ConfigError
from vitkit.models import model_family
from vitkit.tasks import to_device

# one registered name per family (the tiny overrides of tests/_tiny.py make any of them small)
FAMILIES: dict[str, str] = {}
for _name in vitkit.list_models():
    FAMILIES.setdefault(model_family(_name), _name)

# Families whose training forward reads tensor values (or opens an autocast region on the input's device type), which
# meta tensors, shapes without data, cannot do. They take the step on the CPU only; a family that starts to pass on
# meta fails here (strict), so this list stays true.
NOT_ON_META = {
    "ar": "checks that the input codes lie in the vocabulary (reads values)",
    "hart": "its diffusion head looks the noise schedule up at the sampled timesteps",
    "vilt": "the patch positions of each image are read from its pixel mask",
    "t2t_vit": "its performer attention opens torch.autocast(x.device.type), which has no meta device type",
    "vqvae": "its quantizer opens torch.autocast(x.device.type), which has no meta device type",
}

TINY = [
    "data.name=digits", "data.train_fraction=0.25", "model.name=vit_fmnist_tiny", "model.args.img_size=8",
    "model.args.patch_size=2", "model.args.embed_dim=16", "model.args.depth=2", "model.args.num_heads=2",
    "train.batch_size=32", "train.epochs=1", "train.threads=1", "train.progress=false", "augment.hflip=true",
]



def _no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ------------------------------------------------------------------------------------------------ train.device
def test_auto_takes_a_gpu_when_torch_sees_one(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)  # torchrun: the process's own GPU
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")  # cpu even with a GPU
    _no_gpu(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^train.device=cuda but torch .* sees no CUDA device .*use train.device"
                                          r"=auto or cpu$"):
        resolve_device("cuda")


def test_device_setting_is_checked_with_the_config():
    assert load_config(None, ["train.device=cpu"]).train.device == "cpu"
    assert load_config(None, []).train.device == "auto"
    with pytest.raises(ConfigError, match=r"train.device='tpu' must be auto, cpu or cuda"):
        load_config(None, ["train.device=tpu"])


def test_cli_train_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    _no_gpu(monkeypatch)
    run = tmp_path / "run"
    argv = ["train", *[a for s in [*TINY, "train.device=cuda"] for a in ("--set", s)], "--output-dir", str(run)]
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "train.device=cuda but torch" in err[0], err
    assert not run.exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------------ autocast
def test_autocast_dtype_per_device(monkeypatch):
    import vitkit.utils

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, True) is torch.bfloat16 and autocast_dtype(cpu, False) is None
    for native in (True, False):
        monkeypatch.setattr(vitkit.utils, "native_bf16_supported", lambda native=native: native)
        assert autocast_dtype(cpu, "auto") is (torch.bfloat16 if native else None)
    # a GPU that would only emulate bf16 (before Ampere) stays in fp32 under auto; true still asks for bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype(cuda, "auto") is None and autocast_dtype(cuda, True) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype(cuda, "auto") is torch.bfloat16
    assert autocast_dtype(torch.device("meta"), True) is None  # no autocast there: the step runs as it is


# ------------------------------------------------------------------------------------------------ data loading
def test_loader_settings_are_sized_from_the_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert loader_settings(cpu, "auto") == {"num_workers": 0, "pin_memory": False}  # as before: no workers
    assert loader_settings(cpu, 2) == {"num_workers": 2, "pin_memory": False, "prefetch_factor": 2}
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for local_world, workers in (("1", 8), ("2", 7), ("8", 1), ("32", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)  # the node's cores are shared among its processes
        assert loader_settings(cuda, "auto") == {"num_workers": workers, "pin_memory": True, "prefetch_factor": 4}
    assert loader_settings(cuda, 0) == {"num_workers": 0, "pin_memory": True}  # an integer is taken as it is


def _last_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def test_cpu_loader_defaults_and_workers_do_not_change_the_result(tmp_path):
    """``data.num_workers: auto`` on the CPU loads in the main process, unpinned (today's behaviour), and loader
    processes (an explicit integer) train the same weights bit for bit: loading draws no random numbers."""
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path / 'probe'}"])
    loader = Trainer(cfg)._epoch_batches(0)
    assert cfg.data.num_workers == "auto" and loader.num_workers == 0 and not loader.pin_memory
    common = [*TINY, "train.max_steps=3"]
    train(None, [*common, f"output_dir={tmp_path / 'main'}"])
    train(None, [*common, "data.num_workers=1", f"output_dir={tmp_path / 'workers'}"])
    main, workers = _last_weights(tmp_path / "main"), _last_weights(tmp_path / "workers")
    assert all(torch.equal(main[k], workers[k]) for k in main)


# ------------------------------------------------------------------------------------------------ every family
def _train_step(name: str, device: torch.device, bf16: bool | str) -> torch.nn.Module:
    """One forward/backward of ``name`` the way the trainer takes it: parameters on ``device``, the batch moved by
    ``to_device``, the forward under the autocast that ``train.bf16`` gives on that device."""
    over, shape = tiny(name)
    torch.manual_seed(0)
    with torch.device(device):  # on meta: shapes only, no memory and no initialisation arithmetic
        model = vitkit.create_model(name, **over).train()
    x = to_device(torch.randn(2, *shape), device) if device.type != "meta" else torch.randn(2, *shape, device=device)
    dtype = autocast_dtype(device, bf16)
    autocast = nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    with torch.device(device), autocast:  # the captions and codes that _tiny.call draws land on the device too
        out = call(model, x)
        loss = out.logsumexp(-1).mean() if torch.is_tensor(out) else out.loss
    loss.backward()
    assert loss.device.type == device.type
    if device.type != "meta":
        assert torch.isfinite(loss.detach().float()).all(), float(loss)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    # autocast computes in bf16 but the weights and their gradients stay fp32 (what the optimizer steps)
    assert all(p.grad.device.type == device.type and p.grad.dtype == p.dtype for _, p in trainable)
    return model


def _cases() -> list:
    strict = dict(strict=True, raises=(RuntimeError, NotImplementedError))
    return [pytest.param(family, where, id=f"{family}-{where}",
                         marks=[pytest.mark.xfail(reason=NOT_ON_META[family], **strict)]
                         if where == "meta" and family in NOT_ON_META else [])
            for family in FAMILIES for where in ("meta", "cpu")]


@pytest.mark.parametrize(("family", "where"), _cases())
def test_every_family_takes_a_training_step_on_meta_or_cpu(family, where):
    """Each family on meta (the shapes of a forward and backward without memory, so a large configuration is
    checked before any weight exists) and on the CPU under bf16 autocast (``train.bf16=true``; fp32 is
    tests/test_registry.py's backward test)."""
    device = torch.device("meta") if where == "meta" else resolve_device(where)
    _train_step(FAMILIES[family], device, bf16=True)


def test_every_family_is_covered():
    assert set(FAMILIES) >= set(NOT_ON_META) and len(FAMILIES) >= 10, FAMILIES


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.parametrize("family", [f for f, n in FAMILIES.items() if is_classifier(n)])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_classifier_families_take_a_training_step_on_cuda(family):
    model = _train_step(FAMILIES[family], resolve_device("cuda"), bf16="auto")
    assert all(p.is_cuda for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_pins_memory_and_autocasts(tmp_path):
    """A few steps on the GPU: pinned batches, loader processes sized from the device, bf16 where the GPU has it,
    a finite loss, and the CUDA RNG state in the checkpoint (for an exact resume)."""
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY, "train.device=cuda", "train.bf16=auto", f"output_dir={run}"])
    trainer = Trainer(cfg)
    loader = trainer._epoch_batches(0)
    assert trainer.dist.device.type == "cuda" and loader.pin_memory and loader.num_workers >= 1
    assert trainer.bf16 == torch.cuda.is_bf16_supported(including_emulation=False)
    summary = trainer.fit()
    assert summary["finished"] and summary["steps"] == trainer.steps_per_epoch
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert torch.isfinite(torch.tensor(record["train_loss"]))
    state = torch.load(run / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert "cuda" in state["rng"]
