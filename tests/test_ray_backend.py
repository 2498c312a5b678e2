"""`--backend ray`: the same study gives the same records as the local backend, a worker killed mid-training is
retried from its last checkpoint (each row recorded once), the SparseViT search picks what it picks locally, and
without Ray the error names the extra. One local Ray cluster of two nodes (1 CPU each) serves the module."""

from __future__ import annotations

import json
import sys

import pytest

import vitkit.tools.ablate as ablate
from test_ablate import TINY
from test_data import data_no_system_dirs, write_fake_fmnist  # noqa: F401  (fixture)
from vitkit.cli import main as cli_main

RECIPE = "configs/fmnist/vit_tiny.yaml"
# one thread per run on both backends (the numbers may depend on it); a checkpoint every 5 of the 22 steps
SETTINGS = [*TINY, "train.threads=1", "train.checkpoint_every_steps=5"]
VARIANTS = ["none", "learned_1d"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node and a second node process on this machine (`ray start --head` + `ray start --address`)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def local_records(tmp_path_factory):
    """The study trained by the local backend (the reference)."""
    out = tmp_path_factory.mktemp("local")
    ablate.run_ablation(RECIPE, ["pos_embed"], 1, out, SETTINGS, variants=VARIANTS)
    return comparable(out / "results.jsonl")


def comparable(path) -> list[str]:
    """The records of a results file, each row once, without what depends on the machine and the moment
    (:data:`~vitkit.tools.ablate.RECORD_FIELDS_THAT_VARY`) or on the output folder (``run_dir``)."""
    rows = ablate.read_results(path)
    ids = [ablate._row_id(r) for r in rows]
    assert len(ids) == len(set(ids)) == len(VARIANTS), f"{path}: rows recorded {ids}"
    drop = {*ablate.RECORD_FIELDS_THAT_VARY, "run_dir"}
    return sorted(json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True) for r in rows)


def test_ray_backend_writes_the_local_records(ray_cluster, local_records, tmp_path):
    out = tmp_path / "ray"
    args = ["ablate", "--recipe", RECIPE, "--study", "pos_embed", "--seeds", "1", "--variants", ",".join(VARIANTS),
            "--output-dir", str(out), "--backend", "ray", *[a for o in SETTINGS for a in ("--set", o)]]
    assert cli_main(args) == 0
    assert comparable(out / "results.jsonl") == local_records
    assert (out / "ablation_pos_embed.md").is_file()


def test_a_killed_worker_resumes_from_its_last_checkpoint(ray_cluster, local_records, tmp_path, monkeypatch):
    """The first training to write a checkpoint SIGKILLs its own worker (once, for the whole study); Ray runs the
    task again, it continues from that checkpoint, and the results file equals the uninterrupted local one."""
    killed, resumed = tmp_path / "killed.txt", tmp_path / "resumed.txt"

    def run_record_killed_once(recipe, over, run_dir, epochs, model):  # runs in a Ray worker (pickled by value)
        import os
        import signal

        from vitkit.engine import trainer
        from vitkit.tools import ablate as worker_ablate

        save, resume = trainer.Trainer.save, trainer.Trainer._resume

        def save_then_die(self, name="last", *a, **k):
            path = save(self, name, *a, **k)
            if name == "last":
                try:
                    fd = os.open(killed, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return path
                os.write(fd, f"{self.out} {self.step}".encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        def resume_and_say(self, folder):
            resume(self, folder)
            with open(resumed, "a") as f:
                f.write(f"{self.out} {self.step}\n")

        trainer.Trainer.save, trainer.Trainer._resume = save_then_die, resume_and_say
        try:
            return worker_ablate._run_record(recipe, over, run_dir, epochs, model)
        finally:
            trainer.Trainer.save, trainer.Trainer._resume = save, resume

    monkeypatch.setattr(ablate, "_run_record", run_record_killed_once)
    out = tmp_path / "ray"
    ablate.run_ablation(RECIPE, ["pos_embed"], 1, out, SETTINGS, variants=VARIANTS, backend="ray")
    run, step = killed.read_text().split()
    assert int(step) == 5  # killed right after its first (mid-epoch) checkpoint
    assert resumed.read_text().split() == [run, step]  # the retry started from there, once
    assert comparable(out / "results.jsonl") == local_records


def test_without_ray_the_error_names_the_extra(monkeypatch, tmp_path, capsys):
    from vitkit.errors import MissingExtraError
    from vitkit.tools.backends import open_backend

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    args = ["ablate", "--recipe", RECIPE, "--study", "pos_embed", "--seeds", "1", "--variants", "none",
            "--output-dir", str(tmp_path), "--backend", "ray", *[a for o in SETTINGS for a in ("--set", o)]]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vitkit[ray]" in err and "vitkit ablate --backend ray" in err
    with pytest.raises(MissingExtraError, match=r"sparsevit search --backend ray needs ray.*vitkit\[ray\]"), \
            open_backend("ray", feature="vitkit sparsevit search --backend ray"):
        pass
    assert cli_main([*args[:-2 * len(SETTINGS)], "--backend", "local", "--address", "auto"]) == 2
    assert "--address names a Ray cluster" in capsys.readouterr().err


def test_sparsevit_search_on_ray_picks_the_local_candidates(ray_cluster, tmp_path, data_no_system_dirs):  # noqa: F811
    import vitkit
    from vitkit.engine.config import config_to_yaml, load_config
    from vitkit.tools.search import LatencyTable, run_search

    write_fake_fmnist(tmp_path / "fm", n_train=40, n_test=10)
    model = vitkit.create_model("swin_scenes_tiny", img_size=64, embed_dim=8, depths=[1, 1], num_heads=[2, 2])
    model.pretrained_cfg = {**model.pretrained_cfg, "task": "multilabel"}
    model.save_pretrained(tmp_path / "ckpt")
    data_args = {"data_dir": str(tmp_path / "fm"), "num_eval_scenes": 24, "canvas": 64, "max_items": 2}
    cfg = load_config(None, ["task.name=multilabel", "data.name=fmnist_scenes",
                             *[f"data.args.{k}={v}" for k, v in data_args.items()]])
    (tmp_path / "ckpt" / "train_config.yaml").write_text(config_to_yaml(cfg))
    choices = (0.25, 0.5, 0.75, 1.0)
    # a fixed price list: the picks then depend on the scores alone, not on this machine's timings
    table = LatencyTable(choices, [{r: 2.0 * (r - 1.0) for r in choices}] * 2, fixed_ms=4.0, batch_size=2, threads=1)
    found = {}
    for backend in ("local", "ray"):
        found[backend] = run_search(tmp_path / "ckpt", [2.6, 3.2], tmp_path / backend, eval_images=24,
                                    latency_batch=2, choices=choices, population=3, generations=2, table=table,
                                    log=lambda s: None, backend=backend)
        found[backend]["evaluated"] = json.loads((tmp_path / backend / "search.json").read_text())["evaluated"]
    assert len(found["local"]["evaluated"]) > 4
    for key in ("dense_metric", "evaluated"):
        assert found["ray"][key] == found["local"][key]
    for budget in ("2.6ms", "3.2ms"):
        assert found["ray"]["budgets"][budget]["best"] == found["local"]["budgets"][budget]["best"]
