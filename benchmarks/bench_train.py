"""Training-step throughput: vitkit's engine driving a vitkit ViT vs. the same engine driving a transformers ViT.

Both models have the Fashion-MNIST recipe's architecture (28x28x1, patch 4, width 96, depth 6, 3 heads, MLP 192,
10 classes) and are trained by the very same loop: ``Trainer._optimizer_step`` of the vitkit engine (batch
augmentation, loss with label smoothing, backward, gradient clipping, AdamW, LR schedule). Only the module differs.
Timings alternate between the two models in one process, after warm-up, and the medians are reported. Peak RSS
is measured per case in a fresh child process.

    python benchmarks/bench_train.py                  # fp32 and bf16, batch 256
    python benchmarks/bench_train.py --steps 20 --rounds 5 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "fmnist" / "vit_tiny.yaml"


class HFClassifier(nn.Module):
    """transformers' ViTForImageClassification behind the plain ``model(images) -> logits`` interface."""

    def __init__(self) -> None:
        super().__init__()
        from vitkit.utils import make_torchvision_importable

        make_torchvision_importable()  # transformers' vision models import torchvision
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=96, num_hidden_layers=6,
                        num_attention_heads=3, intermediate_size=192, num_labels=10, layer_norm_eps=1e-6)
        cfg._attn_implementation = "sdpa"
        self.vit = ViTForImageClassification(cfg)
        self.pretrained_cfg = {"input_size": (1, 28, 28)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).logits


def build_trainer(kind: str, bf16: bool, batch_size: int, out: Path):
    from vitkit.engine import Trainer, load_config
    from vitkit.engine.optim import build_optimizer, build_scheduler

    cfg = load_config(RECIPE, [f"train.bf16={str(bf16).lower()}", f"train.batch_size={batch_size}",
                               "model.args.drop_path_rate=0.0", f"output_dir={out}", "train.progress=false"])
    trainer = Trainer(cfg)
    if kind == "transformers":
        model = HFClassifier()
        trainer.model = trainer.train_model = model
        trainer.optimizer = build_optimizer(model, cfg.optim)
        trainer.scheduler = build_scheduler(trainer.optimizer, cfg.schedule, cfg.optim.lr, trainer.steps_per_epoch,
                                            cfg.train.epochs)
    trainer.model.train()
    return trainer


def batches(trainer, n: int):
    g = torch.Generator().manual_seed(0)
    ds = trainer.train_set
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(ds), (trainer.micro_batch,), generator=g)
        out.append([(ds.images[idx], ds.labels[idx])])
    return out


def time_steps(trainer, data) -> float:
    start = time.perf_counter()
    for group in data:
        trainer._optimizer_step(group)
    return len(data) * trainer.micro_batch / (time.perf_counter() - start)


def peak_rss_child(kind: str, bf16: bool, batch_size: int, steps: int) -> float:
    """Peak resident memory (MiB) of a fresh process that builds the case and runs ``steps`` training steps."""
    cmd = [sys.executable, __file__, "--child", kind, "--batch-size", str(batch_size), "--steps", str(steps)]
    if bf16:
        cmd.append("--bf16")
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per model; the median is reported")
    p.add_argument("--child", choices=["vitkit", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="/tmp/vitkit_bench_train")
    args = p.parse_args(argv)
    if args.child:
        trainer = build_trainer(args.child, args.bf16, args.batch_size, Path(args.out) / "child")
        time_steps(trainer, batches(trainer, args.steps))
        print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return 0
    torch.manual_seed(0)
    # Children first: Linux keeps a process's RSS high-water mark across fork+exec, so they must be started
    # while this process is still small.
    rss = {(k, bf16): peak_rss_child(k, bf16, args.batch_size, 3)
           for bf16 in (False, True) for k in ("vitkit", "transformers")}
    rows = []
    for bf16 in (False, True):
        trainers = {k: build_trainer(k, bf16, args.batch_size, Path(args.out) / k) for k in ("vitkit", "transformers")}
        data = batches(trainers["vitkit"], args.steps)
        for t in trainers.values():  # warm-up
            time_steps(t, data[:3])
        speeds: dict[str, list[float]] = {k: [] for k in trainers}
        for _ in range(args.rounds):
            for k, t in trainers.items():
                speeds[k].append(time_steps(t, data))
        med = {k: statistics.median(v) for k, v in speeds.items()}
        for k in trainers:
            rows.append({"model": k, "precision": "bf16 autocast" if bf16 else "fp32", "img_s": med[k],
                         "ratio": med[k] / med["transformers"],
                         "params": sum(p.numel() for p in trainers[k].model.parameters()),
                         "peak_rss_mib": rss[(k, bf16)]})
    print(f"training step, Fashion-MNIST ViT recipe (28x28x1, patch 4, 96 wide, 6 blocks), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | precision | params | train img/s | vs transformers | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['params'] / 1e6:.3f}M | {r['img_s']:.0f} | {r['ratio']:.2f}x | "
              f"{r['peak_rss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
