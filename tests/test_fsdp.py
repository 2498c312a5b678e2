"""train.strategy=fsdp (FSDP2 per transformer block), activation checkpointing and sharded (DCP) checkpoints.

Two gloo processes on CPU (torchrun, as tests/test_engine.py launches DDP). This file is also the worker those
processes run: ``torchrun tests/test_fsdp.py OUT DEVICE BF16`` writes every variant's per-step losses and
gradients to OUT, and the tests compare them.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit.engine import load_config, train
from vitkit.engine.fsdp import apply_activation_checkpointing, block_units, load_sharded
from vitkit.errors import CheckpointError, ConfigError

HERE = Path(__file__).resolve()
TINY = [
    "data.name=digits", "model.name=vit_fmnist_tiny", "model.args.img_size=8", "model.args.patch_size=2",
    "model.args.embed_dim=16", "model.args.depth=2", "model.args.num_heads=2", "train.batch_size=64",
    "train.progress=false", "optim.lr=3e-3", "schedule.warmup_epochs=0.5", "train.epochs=2", "train.threads=1",
    "train.strategy=fsdp", "optim.clip_grad=1.0",
    # no key bias: its gradient is zero up to rounding, which AdamW scales to lr-sized steps of noise
    "model.args.qkv_bias=false",
]
MODEL = dict(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2, in_chans=1, num_classes=10,
             drop_path_rate=0.2, drop_rate=0.1)  # random masks: activation checkpointing must replay them
STEPS, BATCH = 3, 8


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(*args: str, nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ the worker
def _worker(out: str, device_type: str, bf16: bool) -> None:
    """Every variant takes the same STEPS steps on the same data from the same weights; rank 0 writes the
    losses (mean over processes) and full gradients of each step, and the final consolidated weights."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from vitkit.engine.distributed import init_distributed
    from vitkit.engine.fsdp import full_state_dict, gathered, prepare_model, shard_model

    if os.environ.get("WORLD_SIZE") == "1":  # one GPU: a one-process group still runs the FSDP code path
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    info = init_distributed()
    from vitkit.engine.distributed import DistInfo

    info = DistInfo(dist.get_rank(), dist.get_world_size(), info.local_rank, info.device)
    rank, world = info.rank, info.world_size
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(STEPS, BATCH * world, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (STEPS, BATCH * world), generator=gen)
    results = {}
    for variant in ("ddp", "fsdp", "fsdp_ac", "ddp_ac"):
        torch.manual_seed(0)
        model = vitkit.create_model("vit_fmnist_tiny", **MODEL).to(info.device)
        strategy, ac = variant.split("_")[0], variant.endswith("_ac")
        if strategy == "fsdp" and world == 1:  # prepare_model leaves one process unsharded; shard it here
            if ac:
                apply_activation_checkpointing(model)
            shard_model(model, info, bf16)
        else:
            prepare_model(model, strategy, ac, info, bf16)
        net = DistributedDataParallel(model) if strategy == "ddp" else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, grads = [], []
        torch.manual_seed(100 + rank)  # the same dropout / drop-path draws in every variant
        for step in range(STEPS):
            mine = slice(rank * BATCH, (rank + 1) * BATCH)
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = net(images[step, mine].to(info.device))
            loss = nn.functional.cross_entropy(logits.float(), labels[step, mine].to(info.device))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
            full = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().cpu()
                    for n, p in model.named_parameters()}
            grads.append(full)
            opt.step()
            opt.zero_grad(set_to_none=True)
        weights = full_state_dict(model)
        with gathered(model):  # rank 0 alone runs the model: no collective may be left in the forward
            if rank == 0:
                with torch.no_grad():
                    solo = model(images[0].to(info.device)).float().cpu()
        dist.barrier()
        results[variant] = {"losses": losses, "grads": grads, "solo": solo if rank == 0 else None,
                            "weights": {k: v.float().cpu() for k, v in weights.items()},
                            "param_types": sorted({type(p).__name__ for p in model.parameters()})}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _check_parity(results: dict, loss_tol: float, grad_tol: float) -> None:
    ddp = results["ddp"]
    for variant in ("fsdp", "fsdp_ac", "ddp_ac"):
        got = results[variant]
        assert max(abs(x - y) for x, y in zip(got["losses"], ddp["losses"])) <= loss_tol, (variant, got["losses"])
        assert max(_max_diff(g, r) for g, r in zip(got["grads"], ddp["grads"])) <= grad_tol, variant
        assert _max_diff(got["weights"], ddp["weights"]) <= grad_tol, variant
        assert (got["solo"] - ddp["solo"]).abs().max().item() <= grad_tol, variant
    assert results["fsdp"]["param_types"] == ["DTensor"] and results["ddp"]["param_types"] == ["Parameter"]
    assert ddp["losses"][0] != ddp["losses"][-1]  # the steps moved the model


def test_fsdp_matches_ddp_with_and_without_activation_checkpointing(tmp_path):
    """2 gloo processes, 3 AdamW steps with clipping: FSDP's losses, gradients (gathered) and weights equal DDP's
    to float tolerance; activation checkpointing (with dropout and drop-path) changes nothing either way."""
    out = tmp_path / "parity.pt"
    _torchrun(str(HERE), str(out), "cpu", "0")
    _check_parity(torch.load(out, weights_only=False), loss_tol=1e-6, grad_tol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_bf16_on_cuda(tmp_path):
    """FSDP with the bf16 policy (bf16 all-gather and compute, fp32 gradient reduction) on up to 2 GPUs (nccl)
    follows DDP under bf16 autocast to bf16 tolerance."""
    out = tmp_path / "parity.pt"
    _torchrun(str(HERE), str(out), "cuda", "1", nproc=min(2, torch.cuda.device_count()))
    _check_parity(torch.load(out, weights_only=False), loss_tol=2e-2, grad_tol=5e-2)


# ------------------------------------------------------------------------------------------------ the trainer
def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(run: Path, ref: Path) -> None:
    got, want = _records(run), _records(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [22, 44]
    for key in ("train_loss", "train_acc", "train_grad_norm", "eval_loss", "eval_top1"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-5, abs=1e-6), key
    diff = _max_diff(load_file(str(run / "checkpoints/last/model.safetensors")),
                     load_file(str(ref / "checkpoints/last/model.safetensors")))
    assert diff <= 1e-5, diff


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted one-process run, and runs cut mid-epoch by 2 processes resumed by 1, and vice versa."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    train(None, [*TINY, f"output_dir={root / 'full'}"])
    cli = [a for item in TINY for a in ("--set", item)]
    _torchrun("-m", "vitkit.cli", "train", *cli, "--set", "train.max_steps=7", "--output-dir", str(root / "two_one"))
    train(None, [], resume=root / "two_one")
    train(None, [*TINY, "train.max_steps=29", f"output_dir={root / 'one_two'}"])
    _torchrun("-m", "vitkit.cli", "train", "--resume", str(root / "one_two"))
    return root


def test_resume_reshards_from_2_processes_to_1_and_from_1_to_2(runs):
    """Cut mid-epoch and resumed with another process count, the run's per-epoch losses, gradient norms, eval
    metrics and final weights equal an uninterrupted run's to float tolerance."""
    _assert_same_run(runs / "two_one", runs / "full")
    _assert_same_run(runs / "one_two", runs / "full")


def test_sharded_checkpoint_is_complete_and_readable_by_every_tool(runs):
    last = runs / "one_two" / "checkpoints" / "last"
    listed = json.loads((last / ".complete").read_text())["files"]
    assert {"model.safetensors", "train_state.pt", "sharded/.metadata"} <= set(listed)
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(listed)  # written by the 2 processes
    model = vitkit.models.from_pretrained(runs / "one_two" / "checkpoints" / "best")  # the consolidated weights
    assert type(model).__name__ == "VisionTransformer"


def test_resume_with_the_other_strategy_is_refused(runs, tmp_path):
    with pytest.raises(CheckpointError, match="train.strategy=fsdp"):
        train(None, ["train.strategy=ddp", f"output_dir={tmp_path / 'x'}"], resume=runs / "full")
    train(None, [*TINY, "train.strategy=ddp", "train.max_steps=2", f"output_dir={tmp_path / 'ddp'}"])
    with pytest.raises(CheckpointError, match="train.strategy=ddp"):
        train(None, ["train.strategy=fsdp"], resume=tmp_path / "ddp")


def test_wrong_model_and_hostile_shard_metadata_are_refused(runs, tmp_path):
    """One line for another model's shards; DCP reads .metadata with pickle: vitkit's reader builds nothing but
    DCP's metadata classes."""
    import shutil

    folder = tmp_path / "last"
    shutil.copytree(runs / "full" / "checkpoints" / "last", folder)
    state = torch.load(folder / "train_state.pt", weights_only=True)
    other = vitkit.create_model("vit_fmnist_tiny", **MODEL)  # with the key bias the run's model lacks
    with pytest.raises(CheckpointError, match=r"another model.*Missing key.*blocks\.0\.attn\.qkv\.bias"):
        load_sharded(folder, other, {"model": torch.optim.AdamW(other.parameters())}, state)
    model = vitkit.create_model("vit_fmnist_tiny", **{**MODEL, "qkv_bias": False})
    optimizers = {"model": torch.optim.AdamW(model.parameters())}
    load_sharded(folder, model, optimizers, state)  # the genuine file loads

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "sharded" / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_sharded(folder, model, optimizers, state)


# ------------------------------------------------------------------------------------------------ units, config
def test_units_and_single_process_activation_checkpointing():
    """Blocks are the units (outermost only); checkpointing keeps parameter names, loss and gradients."""
    torch.manual_seed(0)
    plain = vitkit.create_model("vit_fmnist_tiny", **MODEL)
    assert block_units(plain) == list(plain.blocks)
    ckpt = vitkit.create_model("vit_fmnist_tiny", **MODEL)
    ckpt.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(ckpt) == 2
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 1, 8, 8)
    for model in (plain, ckpt):
        torch.manual_seed(5)
        model(x).logsumexp(-1).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name

    from _tiny import tiny

    swin = vitkit.create_model("swin_fmnist_tiny", **tiny("swin_fmnist_tiny")[0])  # blocks inside stages
    units = block_units(swin)
    assert len(units) == 3 and all(type(u).__name__ == "SwinBlock" for u in units)


def test_strategy_settings_are_checked():
    assert load_config(None, []).train.strategy == "ddp"
    with pytest.raises(ConfigError, match="train.strategy='zero' must be ddp or fsdp"):
        load_config(None, ["train.strategy=zero"])
    with pytest.raises(ConfigError, match="ema_decay needs train.strategy=ddp"):
        load_config(None, ["train.strategy=fsdp", "train.ema_decay=0.9"])


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
