"""Where independent jobs run: the trainings of ``vitkit ablate``, the candidate scores of ``vitkit sparsevit search``.

* ``local`` (the default): in this process, or ``jobs`` spawned worker processes side by side.
* ``ray``: one Ray task per job, asking for the CPUs (and, on a cluster with GPUs, the GPU) that it needs, on a
  local Ray instance or a cluster (``--address auto|HOST:PORT``). A worker or node that dies is retried by Ray
  (:data:`RAY_RETRIES` times); a retried training continues from its run folder's last checkpoint, so the run
  folders must be on a filesystem every node sees, at the same path (on one machine they are).

Either way the caller's process alone consumes the results, as each job ends (``ray.wait``): it is the only
writer of a results file, so a retried job is recorded once and a finished one is never lost. What may differ
between backends is only what a job measures about its machine (timings, load, the machine's facts).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigError, TrainingError, VitkitError

BACKENDS = ("local", "ray")
RAY_RETRIES = 3  # a job whose worker (or node) dies is started again this many times
# environment variables the Ray workers get from the command that submits the jobs (data and cache folders)
FORWARDED_ENV_PREFIX = "VITKIT_"


def die_with_parent() -> None:
    """Worker initializer: on Linux, ask the kernel to SIGTERM this worker when the process that started it dies
    (even by SIGKILL), so an interrupted ``vitkit ablate`` leaves no orphan trainings running; a killed training
    resumes from its last checkpoint on the next call."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalBackend:
    """Jobs on this machine: in this process (``jobs`` 1), or ``jobs`` spawned processes side by side."""

    name = "local"

    def __init__(self, jobs: int = 1) -> None:
        self.jobs = jobs

    def run_each(self, fn: Callable[..., Any], calls: dict[Hashable, tuple], on_done: Callable[[Any, Any], None],
                 cpus: int = 1, gpus: float = 0, what: str = "job") -> None:
        """``on_done(key, fn(*args))`` for every ``key: args`` of ``calls``, in this process, as each ends."""
        if self.jobs <= 1:
            for key, args in calls.items():
                on_done(key, fn(*args))
            return
        # spawn, not fork: a forked child would inherit the parent's OpenMP thread pool in an undefined state
        with ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=die_with_parent) as pool:
            futures = {pool.submit(fn, *args): key for key, args in calls.items()}
            for future in as_completed(futures):
                on_done(futures[future], future.result())

    def share(self, value: Any) -> Any:
        """What :meth:`map` hands every call: here, the value itself."""
        return value

    def map(self, fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any], cpus: int = 1) -> list[Any]:
        """``[fn(shared, item) for item in items]``, in this process (the state is already here)."""
        return [fn(shared, item) for item in items]


def _call_in(cwd: str, fn: Callable[..., Any], args: tuple, *shared: Any) -> Any:
    """A Ray task: ``fn(*shared, *args)`` in the submitting command's folder, so relative paths (recipe, run
    folders, data) mean on every node what they mean where the command was typed. ``shared``: objects of the
    object store, passed apart because Ray resolves references only among a task's own arguments."""
    if not os.path.isdir(cwd):
        import socket

        raise ConfigError(f"{cwd}: the folder `vitkit` was started in is not on Ray node {socket.gethostname()}; "
                          "the ray backend needs the same folders on every node (a shared filesystem)")
    os.chdir(cwd)
    return fn(*shared, *args)


def _first_line(error: BaseException) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


class RayBackend:
    """Jobs as Ray tasks. Enter it to connect (``address``: ``auto``, ``HOST:PORT``, or None to use the Ray
    instance this process already has, else start a local one with this machine's CPUs); leaving it shuts down
    only a Ray instance it started."""

    name = "ray"

    def __init__(self, address: str | None = None, retries: int = RAY_RETRIES, feature: str = "--backend ray") -> None:
        from ..utils import require_extra

        self.ray = require_extra("ray", "ray", feature)
        self.address, self.retries, self._started = address, retries, False

    def __enter__(self) -> RayBackend:
        if not self.ray.is_initialized():
            env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIX)}
            kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
            if self.address is None:
                kwargs["include_dashboard"] = False
            try:
                self.ray.init(address=self.address, log_to_driver=True, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                if self.address is None:
                    raise ConfigError(f"cannot start a local Ray instance ({_first_line(e)})") from None
                raise ConfigError(f"--address {self.address}: cannot connect to a Ray cluster ({_first_line(e)}); "
                                  "start one with `ray start --head`") from None
            self._started = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False

    def _largest_node(self, resource: str) -> float:
        return max((n.get("Resources", {}).get(resource, 0.0) for n in self.ray.nodes() if n.get("Alive")),
                   default=0.0)

    def fit_cpus(self, cpus: int) -> int:
        """``cpus``, or the most CPUs one node has when that is fewer (a task asking for more never runs)."""
        return max(1, min(cpus, int(self._largest_node("CPU")) or cpus))

    def gpus_per_job(self) -> float:
        """One GPU per training where the cluster has GPUs (on a CPU-only cluster, none)."""
        return 1.0 if self._largest_node("GPU") >= 1 else 0.0

    def _remote(self, cpus: int, gpus: float) -> Any:
        # worker and node deaths are retried; an error the job raises itself (a bad recipe) would only raise again
        return self.ray.remote(_call_in).options(num_cpus=cpus, num_gpus=gpus, max_retries=self.retries,
                                                 retry_exceptions=False)

    def _unwrap(self, error: Exception, what: str) -> Exception:
        """The job's own exception (a ConfigError stays one line), or one line for a job Ray gave up on."""
        cause = getattr(error, "cause", None)
        if isinstance(error, self.ray.exceptions.RayTaskError) and isinstance(cause, VitkitError):
            return cause
        if isinstance(error, self.ray.exceptions.RayTaskError) and isinstance(cause, Exception):
            return TrainingError(f"{what} failed on Ray: {type(cause).__name__}: {_first_line(cause)}")
        return TrainingError(f"{what}: Ray gave up after {self.retries} retries ({_first_line(error)}); run the "
                             "command again to continue from the last checkpoint")

    def run_each(self, fn: Callable[..., Any], calls: dict[Hashable, tuple], on_done: Callable[[Any, Any], None],
                 cpus: int = 1, gpus: float = 0, what: str = "job") -> None:
        """One task per ``key: args``; ``on_done(key, result)`` here as each task ends. A failed job does not stop
        the others: they are recorded, then the first failure is raised (naming the ``what`` and its key)."""
        remote, cwd = self._remote(cpus, gpus), os.getcwd()
        refs = {remote.remote(cwd, fn, args): key for key, args in calls.items()}
        failure: Exception | None = None
        while refs:
            ready, _ = self.ray.wait(list(refs), num_returns=1)
            key = refs.pop(ready[0])
            try:
                result = self.ray.get(ready[0])
            except self.ray.exceptions.RayError as e:
                failure = failure or self._unwrap(e, f"{what} {key}")
                continue
            on_done(key, result)
        if failure is not None:
            raise failure

    def share(self, value: Any) -> Any:
        """Put ``value`` in Ray's object store once; every task of :meth:`map` reads it from there."""
        return self.ray.put(value)

    def map(self, fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any], cpus: int = 1) -> list[Any]:
        """``fn(shared, item)`` for every item, one Ray task each; results in the order of ``items``."""
        remote, cwd = self._remote(self.fit_cpus(cpus), 0), os.getcwd()
        try:
            return self.ray.get([remote.remote(cwd, fn, (item,), shared) for item in items])
        except self.ray.exceptions.RayError as e:
            raise self._unwrap(e, f"{getattr(fn, '__name__', 'job')}") from None


Backend = LocalBackend | RayBackend


def check_backend(name: str, address: str | None = None) -> None:
    """A ConfigError for an unknown backend, or an ``--address`` without ``--backend ray``."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from {list(BACKENDS)}")
    if name == "local" and address is not None:
        raise ConfigError("--address names a Ray cluster; use it with --backend ray")


@contextmanager
def open_backend(name: str = "local", address: str | None = None, jobs: int = 1, feature: str = "--backend ray"):
    """The backend ``name`` (``local`` with ``jobs`` processes, or ``ray`` at ``address``), ready to take jobs;
    ``feature`` is what the error names when Ray is not installed (``vitkit ablate --backend ray``)."""
    check_backend(name, address)
    if name == "local":
        yield LocalBackend(jobs)
        return
    with RayBackend(address, feature=feature) as backend:
        yield backend


def add_backend_args(p: Any, what: str) -> None:
    """``--backend local|ray`` and ``--address``, for a command whose ``what`` are independent jobs."""
    p.add_argument("--backend", choices=BACKENDS, default="local",
                   help=f"where the {what} run: local (this machine, the default) or ray (one Ray task each, "
                        "run again if its worker dies, a training from its last checkpoint; pip install "
                        "'vitkit[ray]'). With ray, run folders, results and data must be on a filesystem every "
                        "node sees, at the same path (docs/distributed.md)")
    p.add_argument("--address", metavar="auto|HOST:PORT",
                   help="with --backend ray: the Ray cluster to use (auto: the one `ray start --head` started "
                        "on this machine); without it, a local Ray instance with this machine's CPUs")
