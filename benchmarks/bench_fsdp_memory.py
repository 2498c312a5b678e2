"""Peak memory per process, DDP vs FSDP (``train.strategy``), for ViT-B/16 and ViT-L/16 at a global batch of 8.

Each case is a fresh ``torchrun`` of N processes (gloo on CPU, nccl on GPUs) that takes a few AdamW steps on
random 224x224 images. Per process it reports:

* ``state_mib``: the bytes of parameters + gradients + AdamW state this process holds (exact, by counting the
  local shards): DDP holds all of it, FSDP a 1/N shard;
* ``peak_rss_mib`` (CPU): the resident-set high-water mark (``getrusage``), and ``delta_rss_mib``, the same
  minus the process's RSS before the model was built (torch, the process group): what training added;
* ``cuda_peak_mib`` (GPU): ``torch.cuda.max_memory_allocated``.

On CPU the workers run with ``MALLOC_MMAP_THRESHOLD_=1 MiB`` (``--malloc-mmap-threshold``): large blocks are then
returned to the system when freed, so the RSS peak measures memory held rather than glibc's fragmentation.

FSDP builds the model on the meta device and materializes only its shards (as a large model must); DDP builds
it whole. Activations are not sharded, so the peak saves less than the state does; ``--activation-checkpointing``
adds variants that recompute each block in backward.

    python benchmarks/bench_fsdp_memory.py                                   # ViT-B and ViT-L, ddp and fsdp
    python benchmarks/bench_fsdp_memory.py --models vit_base_patch16_224 --activation-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fsdp_memory.jsonl"
MIB = 2**20


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(args: argparse.Namespace) -> None:
    """One process of one case: build, shard or replicate, take the steps, write this rank's numbers."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import vitkit
    from vitkit.engine.distributed import init_distributed
    from vitkit.engine.fsdp import apply_activation_checkpointing, shard_model

    info = init_distributed()
    device = info.device
    before = _current_rss_mib()
    if args.strategy == "fsdp":
        with torch.device("meta"):
            model = vitkit.create_model(args.model)
        if args.ac:
            apply_activation_checkpointing(model)
        shard_model(model, info, bf16=False)
        model.to_empty(device=device)
        with torch.no_grad():  # values do not matter for memory; keep them finite
            for p in model.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).normal_(0, 0.02)
    else:
        model = vitkit.create_model(args.model).to(device)
        if args.ac:
            apply_activation_checkpointing(model)
    net = DistributedDataParallel(model) if args.strategy == "ddp" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    per_process = args.batch // info.world_size
    images = torch.randn(per_process, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (per_process,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    grads = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        nn.functional.cross_entropy(net(images), labels).backward()
        grads = sum(_local_bytes(p.grad) for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / args.steps
    params = sum(_local_bytes(p) for p in model.parameters())
    optim = sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    record = {"rank": info.rank, "params_mib": params / MIB, "grads_mib": grads / MIB, "optim_mib": optim / MIB,
              "state_mib": (params + grads + optim) / MIB, "peak_rss_mib": _rss_mib(),
              "delta_rss_mib": _rss_mib() - before, "step_s": seconds,
              "cuda_peak_mib": torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else None}
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(record))
    if info.enabled:
        dist.barrier()
        dist.destroy_process_group()


def run_case(model: str, strategy: str, ac: bool, args: argparse.Namespace) -> dict:
    """One fresh torchrun: the largest value over its processes, per measurement."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--worker", "--model", model, "--strategy", strategy, "--batch", str(args.batch),
               "--steps", str(args.steps), "--out", out, *(["--ac"] if ac else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{model} {strategy}: torchrun failed\n{proc.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    worst = {k: max(r[k] for r in ranks) for k in ranks[0] if k != "rank" and ranks[0][k] is not None}
    return {"model": model, "strategy": strategy + ("+ac" if ac else ""), "processes": args.nproc,
            "global_batch": args.batch, "steps": args.steps, "malloc_mmap_threshold": args.malloc_mmap_threshold,
            **worst}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "vit_large_patch16_224"])
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    p.add_argument("--activation-checkpointing", action="store_true", help="also each strategy with it on")
    p.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--malloc-mmap-threshold", type=int, default=2**20,
                   help="glibc MALLOC_MMAP_THRESHOLD_ for the workers (0: glibc's default). FSDP frees and "
                        "re-gathers every block's parameters each step; with the default dynamic threshold glibc "
                        "keeps those freed blocks, and the RSS high-water mark grows step after step with "
                        "fragmentation instead of measuring what is held")
    p.add_argument("--no-save", action="store_true", help=f"do not append to {RESULTS.relative_to(REPO)}")
    # the worker side (one process of one case)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from vitkit.tools.ablate import machine_facts

    facts = {**machine_facts(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(f"{facts['cpu']}, {facts['cores']} cores, torch {facts['torch']}, {facts['device']}; "
          f"{args.nproc} processes, global batch {args.batch}, {args.steps} AdamW steps")
    head = f"{'model':<24} {'strategy':<9} {'state MiB':>10} {'peak RSS MiB':>13} {'added RSS MiB':>14}"
    head += f" {'CUDA peak MiB':>14}" if torch.cuda.is_available() else ""
    print(head)
    rows = []
    for model in args.models:
        for strategy in args.strategies:
            for ac in (False, True) if args.activation_checkpointing else (False,):
                row = run_case(model, strategy, ac, args)
                rows.append(row)
                line = (f"{model:<24} {row['strategy']:<9} {row['state_mib']:>10.0f} {row['peak_rss_mib']:>13.0f} "
                        f"{row['delta_rss_mib']:>14.0f}")
                line += f" {row.get('cuda_peak_mib', 0):>14.0f}" if torch.cuda.is_available() else ""
                print(line, flush=True)
                if not args.no_save:
                    RESULTS.parent.mkdir(parents=True, exist_ok=True)
                    with open(RESULTS, "a", encoding="utf-8") as f:
                        f.write(json.dumps({**row, "machine": facts, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                                + "\n")
    for model in args.models:  # the ratio that matters: how much less each FSDP process holds
        base = next((r for r in rows if r["model"] == model and r["strategy"] == "ddp"), None)
        for r in rows:
            if base is not None and r["model"] == model and r["strategy"] != "ddp":
                print(f"{model} {r['strategy']}: state {base['state_mib'] / r['state_mib']:.2f}x smaller, "
                      f"added RSS {base['delta_rss_mib'] / r['delta_rss_mib']:.2f}x smaller than ddp")


if __name__ == "__main__":
    main()
