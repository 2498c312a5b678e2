"""Frozen-encoder probes of pretrained checkpoints next to a randomly initialised encoder of the same shape.

Every encoder is loaded the same way, as the classifier a fine-tuning recipe would build (the backbone of an MAE
or contrastive checkpoint goes into ``--model``; decoder / projection head dropped), and probed on its pooled
pre-logits features: weighted k-NN (k=20, T=0.07) and an L-BFGS linear probe fitted on the training set,
top-1 on the test set. The random encoders give the floor a probe reaches without any pretraining.

    python benchmarks/ssl_probes.py --checkpoint mae=runs/ssl/mae --checkpoint contrastive=runs/ssl/contrastive \
        --results docs/ssl/probes.jsonl

With ``--results`` every probe is appended as one JSON line (``kind: probe``: encoder, seed or checkpoint,
metrics, seconds, machine), and so is every evaluation each pretraining run logged in its ``metrics.jsonl``
(``kind: pretraining``: encoder, epoch, step, its ``eval_*`` metrics), which docs/ssl.md's tables are built from.
The probes use every training label and read the test images only to score, once; nothing is chosen on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a pretraining run or checkpoint folder (repeatable)")
    p.add_argument("--model", default="vit_fmnist_tiny", help="the encoder architecture the checkpoints hold")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--random-seeds", type=int, default=2, help="randomly initialised encoders to probe")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", help="append the probes and the pretraining runs' evaluations here (JSON lines)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import vitkit
    from vitkit.data import batch_collate, build_dataset
    from vitkit.data.transforms import build_transforms
    from vitkit.tasks import TaskContext
    from vitkit.tasks.base import checkpoint_folder
    from vitkit.tasks.probe import evaluate_probes

    train_set = build_dataset(args.data, "train")
    test_set = build_dataset(args.data, "test")
    ctx = TaskContext(train_set=train_set, eval_set=test_set, collate=batch_collate)
    encoders: list[tuple[str, torch.nn.Module]] = []
    for seed in range(args.random_seeds):
        torch.manual_seed(seed)
        encoders.append((f"random init (seed {seed})", vitkit.create_model(args.model, num_classes=0)))
    records: list[dict] = []
    sources = {f"random init (seed {seed})": {"encoder": "random init", "seed": seed}
               for seed in range(args.random_seeds)}
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = vitkit.create_model(args.model, pretrained=checkpoint_folder(path), num_classes=0)
        for w in caught:
            print(f"[{name}] {w.message}", file=sys.stderr)
        encoders.append((f"{name} ({path})", model))
        sources[f"{name} ({path})"] = {"encoder": name, "checkpoint": path}
        metrics = os.path.join(path, "metrics.jsonl")
        if os.path.isfile(metrics):
            with open(metrics) as f:
                for line in f:
                    row = json.loads(line)
                    evals = {k: v for k, v in row.items() if k.startswith("eval_")}
                    if evals:
                        records.append({"kind": "pretraining", "encoder": name, "epoch": row.get("epoch"),
                                        "step": row.get("step"), **evals})
    from vitkit.tools.timing import cpu_name

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version()}

    print("| encoder | k-NN top-1 | linear-probe top-1 | linear-probe train top-1 | seconds |")
    print("|---|---|---|---|---|")
    for name, model in encoders:
        cfg = model.pretrained_cfg
        mean, std = (tuple(train_set.mean), tuple(train_set.std)) if "random" in name else (cfg["mean"], cfg["std"])
        tf = build_transforms(None, False, mean, std, tuple(cfg["input_size"][1:]))
        start = time.perf_counter()
        out = evaluate_probes(model, ctx, lambda b, tf=tf: (tf(b[0]), b[1]))
        seconds = time.perf_counter() - start
        print(f"| {name} | {100 * out['knn_top1']:.2f}% | {100 * out['linear_top1']:.2f}% | "
              f"{100 * out['linear_train_top1']:.2f}% | {seconds:.0f} |", flush=True)
        records.append({"kind": "probe", **sources[name], **{k: float(v) for k, v in out.items()},
                        "seconds": round(seconds, 1), "machine": machine})
    if args.results:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"{len(records)} records appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
