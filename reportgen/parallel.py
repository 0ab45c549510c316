"""Scale-out: independent pieces of ascent work on local processes (joblib/loky) or a Dask cluster.

A piece is a run of whole chunks of one pass. What travels to a worker is plain data (`AscentWork`: the
spec's path, the model key, the recipe, the requests with their content keys), never Keras objects: the
worker loads the spec and the model itself (once per process), checks that its own content keys match
the planner's (same weights, preprocessing and code), runs the chunks and writes each result into the
store, whose folder every worker must see (a shared filesystem on a cluster). Store writes are atomic,
so a result is either complete or absent, whichever worker or run wrote it.

The ascent gives the same pixels whatever the batch composition (see `reportgen.engine.ascent`), so a
cluster run's results match a local run's on the same kind of device.

Backends: `loky` (local processes, `--jobs N`; `--jobs 1` runs in the main process) and `dask`
(`--scheduler tcp://host:8786`: joblib's dask backend on a `distributed.Client`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from reportgen.errors import ReportgenError

BACKENDS = ("loky", "dask")


@dataclass(frozen=True)
class Backend:
    """Where passes run: `loky` with `jobs` local processes, or `dask` on the cluster at `scheduler`."""

    name: str = "loky"
    jobs: int = 1
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ReportgenError(f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")
        if self.name == "dask" and not self.scheduler:
            raise ReportgenError("--backend dask needs --scheduler ADDRESS (e.g. tcp://scheduler-host:8786)")
        if self.jobs < 1:
            raise ReportgenError(f"--jobs must be at least 1 (got {self.jobs})")

    @property
    def in_process(self) -> bool:
        return self.name == "loky" and self.jobs == 1

    @property
    def planned_workers(self) -> int:
        """Workers the planner shards for (`--dry-run` too): the local processes, or the worker threads of
        the Dask cluster, asked from its scheduler (so a cluster that cannot be reached fails the plan as
        it would fail the run). The executor cuts the same shards from the count it gets when it runs."""
        if self.name == "loky":
            return self.jobs
        client = dask_client(self)
        try:
            return cluster_workers(client)
        finally:
            client.close()

    @property
    def memory_share(self) -> float:
        """Local processes share this machine's memory; dask workers size batches on their own machine."""
        return 1.0 / self.jobs if self.name == "loky" else 1.0

    def run_passes(
        self, passes: list[Any], spec_path: Any, precision: str, progress: Any, batch_size: int | None
    ) -> tuple[set[str], set[str]]:
        """`run_passes` on this backend: the scheduler calls it through the backend it is handed, so the
        scheduler never imports this module (which imports the scheduler's key and store functions)."""
        return run_passes(passes, spec_path, precision, self, progress, batch_size)

    def describe(self) -> str:
        if self.name == "dask":
            return f"dask cluster at {self.scheduler}"
        return "this process" if self.in_process else f"{self.jobs} local processes (loky)"


@dataclass(frozen=True)
class AscentWork:
    """One piece of a pass, as plain data for a worker: the requests themselves (any objective,
    diversity groups whole, class models), each with the content key the planner gave it."""

    spec_path: str
    model: str
    recipe: dict[str, Any]
    precision: str
    layers: tuple[str, ...]  # the whole pass's layers: the same program as a local run
    items: tuple[tuple[Any, str], ...]  # (reportgen.work.AscentRequest, content key)
    batch_size: int | None  # None: the worker sizes chunks for its own device
    memory_share: float = 1.0
    threads: int | None = None  # TensorFlow intra-op threads for a local worker process
    index: int = 0  # position of the piece's pass in the plan


_WORKER_MODELS: dict[tuple[str, str, str], Any] = {}


def worker_model(spec_path: str, model: str) -> Any:
    """The model of a spec, loaded once per worker process (keyed by the spec file's content)."""
    from reportgen.models import ModelRegistry
    from reportgen.spec.load import load_spec, spec_sha256

    cache_key = (spec_path, spec_sha256(spec_path), model)
    if cache_key not in _WORKER_MODELS:
        _WORKER_MODELS[cache_key] = ModelRegistry(load_spec(spec_path)).get(model)
    return _WORKER_MODELS[cache_key]


def start_worker(spec_path: str, threads: int | None) -> Any:
    """What every worker entry point does first: load its own copy of the spec, choose TensorFlow's CPU
    kernels for it before TensorFlow is imported, and take the thread count the host gave it."""
    from reportgen.device import select_cpu_kernels
    from reportgen.spec.load import load_spec

    spec = load_spec(spec_path)
    select_cpu_kernels(spec)
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # the worker already ran TensorFlow: keep its pool
            pass
    return spec


def run_ascent_work(work: AscentWork) -> dict[str, Any]:
    """Worker entry point: load the model from the spec, run the piece's chunks, store every result."""
    spec = start_worker(work.spec_path, work.threads)
    from reportgen.device import device_description
    from reportgen.engine.recipes import Recipe
    from reportgen.engine.scheduler import pass_program, request_key, run_chunks
    from reportgen.plan import batch_size_for, device_budget, sample_cost
    from reportgen.store import Store, store_root
    from reportgen.work import CLASS_TAG

    t0 = time.perf_counter()
    host = socket.gethostname()
    lm = worker_model(work.spec_path, work.model)
    recipe = Recipe(**work.recipe)
    for req, key in work.items:
        if req.recipe != recipe or request_key(lm, req, work.precision) != key:
            raise ReportgenError(
                f"worker {host}: model {work.model!r} of {work.spec_path} is not the model the run planned "
                f"with (weights digest {lm.digest[:16]}); every worker must see the same spec, model files "
                "and reportgen version at the same paths"
            )
    store = Store(store_root(spec))
    program = pass_program(lm, work.layers, recipe, work.precision)
    computed = [lm.model.layers[-1].name] if work.layers == (CLASS_TAG,) else list(work.layers)
    batch = work.batch_size or batch_size_for(
        sample_cost(lm, computed, program.size, work.precision), device_budget(work.memory_share)
    )
    # the local run's chunk loop: stored results (a retried piece) are skipped, groups kept whole
    done, _ = run_chunks(
        store, program, [req for req, _ in work.items], [key for _, key in work.items], batch, lambda n: None
    )
    return {
        "index": work.index,
        "keys": done,
        "items": len(work.items),
        "device": f"{host}: {device_description()}",
        "seconds": time.perf_counter() - t0,
        "batch": batch,
    }


def dask_client(backend: Backend, default: bool = False) -> Any:
    """A `distributed.Client` of the backend's scheduler (the caller closes it); `default`: joblib's dask
    backend then uses it. One line on stderr when dask is not installed or the scheduler is unreachable."""
    try:
        from distributed import Client
    except ImportError:
        raise ReportgenError(
            "--backend dask needs dask.distributed: pip install 'reportgen[cluster]'"
        ) from None
    try:
        return Client(backend.scheduler, timeout="30s", set_as_default=default)
    except (OSError, TimeoutError) as exc:
        raise ReportgenError(
            f"cannot reach the Dask scheduler at {backend.scheduler} ({exc}); start it with "
            f"`dask scheduler` and workers with `dask worker {backend.scheduler}`"
        ) from None


def cluster_workers(client: Any) -> int:
    """Workers a pass is cut for on a Dask cluster: its worker threads (each runs one shard at a time)."""
    return max(1, sum(client.nthreads().values()))


@contextmanager
def _joblib_backend(backend: Backend) -> Iterator[int]:
    """joblib configured for the backend; yields the number of workers that will share the pieces."""
    from joblib import parallel_config

    if backend.name == "dask":
        client = dask_client(backend, default=True)
        try:
            workers = cluster_workers(client)
            with parallel_config(backend="dask", n_jobs=-1):
                yield workers
        finally:
            client.close()
        return
    with parallel_config(backend="loky", n_jobs=backend.jobs):
        yield backend.jobs


def run_passes(
    passes: list[Any], spec_path: Any, precision: str, backend: Backend, progress: Any, batch_size: int | None
) -> tuple[set[str], set[str]]:
    """Run the pending passes' pieces on the backend; returns (keys stored, worker devices)."""
    from joblib import Parallel, delayed

    from reportgen.plan import ascent_pieces

    if spec_path is None:
        raise ReportgenError("parallel runs need the spec's path: workers load the models from it")
    spec_path = str(os.path.abspath(spec_path))
    threads = max(1, (os.cpu_count() or 1) // backend.jobs) if backend.name == "loky" else None
    done: set[str] = set()
    devices: set[str] = set()
    with _joblib_backend(backend) as workers, progress.board() as board:
        works, advances = [], []
        for index, p in enumerate(passes):
            advances.append(
                board.add(f"{p.label()} on {backend.describe()}", p.pending)
            )
            for piece in ascent_pieces(p, workers):
                items = tuple((p.requests[i], p.keys[i]) for i in piece)
                # the planner's chunk size, unless dask workers may size their own (no --batch-size)
                chunk = batch_size if backend.name == "dask" else min(p.batch_size, len(items))
                works.append(
                    AscentWork(
                        spec_path,
                        p.model,
                        p.recipe.as_dict(),
                        precision,
                        p.layers,
                        items,
                        chunk,
                        backend.memory_share,
                        threads,
                        index,
                    )
                )
        results = Parallel(batch_size=1, return_as="generator_unordered")(
            delayed(run_ascent_work)(w) for w in works
        )
        for res in results:
            done.update(res["keys"])
            devices.add(res["device"])
            advances[res["index"]](res["items"])
    return done, devices
