"""The executor of dataset passes: one chunk loop (compute -> store atomically -> progress), here, on
local processes or on a Dask cluster, with out-of-memory back-off.

A pass (`reportgen.plan.DatasetPass`) is cut into shards of file ranges (`plan.shard_ranges`). Each shard
runs one streamed forward pass over its images and is stored under its own key as soon as it finishes,
so a killed run over a big folder resumes from the last stored shard. With a parallel backend the shards
run on the workers: only plain data travels (`DatasetShard`: the spec's path, model and dataset keys, the
file range, the content keys), each worker loads the spec, the model and the dataset itself, recomputes
the content keys and refuses work whose keys differ (other weights, other files, other code), and writes
its shard into the shared store. The host then merges the shards exactly: per-image rows are placed at
their file's index (per-class sums are computed from them by the section), undecodable files are listed
by their index in the pass.

Image passes (`reportgen.plan.ImagePass`) run here too, before any section builds: each request (activation
maps, Grad-CAM, saliency, occlusion) is computed by its engine with the pass's batch and stored under its
key; its section's `build` only reads it. With a parallel backend a request is cut into shards of image
ranges (`ImageShard`, at least one per worker) that the workers compute as they do dataset shards: plain
data travels, each worker loads spec, model and dataset, recomputes the shard's key and refuses work whose
key differs, and stores its arrays; the host merges them exactly (`merge_image_shards`).

`with_backoff` is the out-of-memory back-off of every kind: the batch is halved and the work retried,
as the ascent program does for its chunks.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from reportgen.errors import NothingDecodedError, ReportgenError
from reportgen.progress import log

T = TypeVar("T")


def with_backoff(run: Callable[[int], T], batch: int, what: str) -> T:
    """`run(batch)`, halving the batch after each out-of-memory error until it fits (or one sample fails)."""
    import tensorflow as tf

    while True:
        try:
            return run(batch)
        except tf.errors.ResourceExhaustedError:
            if batch <= 1:
                raise
            log.warning("%s: out of memory with a batch of %d; retrying with %d", what, batch, batch // 2)
            batch //= 2


def compute_shard(
    lm: Any,
    items: list[Any],
    layers: tuple[str, ...],
    outputs: bool,
    batch: int,
    on_batch: Callable[[int], None] | None = None,
    peaks: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """One shard's arrays: "means:<layer>" (n, C), "outputs" (n, K), "missing" (indices in the shard), and
    for each peak piece ("topk:<k>:<layer>") "<piece>.value|index|y|x" (k, C): the shard's k best images
    per channel, indexed within the shard."""
    from reportgen.engine import topk
    from reportgen.engine.forward import forward
    from reportgen.work import parse_peak

    wanted = [(stat, layer) for stat, _, layer in map(parse_peak, peaks)]
    result = with_backoff(
        lambda b: forward(
            lm, items, list(layers), outputs=outputs, batch_size=b, on_batch=on_batch, peaks=wanted
        ),
        batch,
        f"dataset pass {lm.key}",
    )
    arrays = {f"means:{layer}": result.means[layer] for layer in layers}
    for piece in peaks:
        stat, k, layer = parse_peak(piece)
        value, y, x = result.peaks[(stat, layer)]
        best = topk.select(value, np.arange(len(value)), y, x, k, largest=stat == "topk")
        arrays.update({f"{piece}.{name}": a for name, a in best.items()})
    if outputs:
        assert result.outputs is not None
        arrays["outputs"] = result.outputs
    arrays["missing"] = np.asarray(result.missing, np.int64)
    arrays["pid"] = np.asarray(os.getpid(), np.int64)
    return arrays


def merge_shards(p: Any, store: Any) -> list[str]:
    """Place every stored shard's rows at their index in the pass, store each pending piece under its key;
    returns the keys stored. Rows are copied, never recomputed or averaged: the merge is exact."""
    from reportgen.engine import topk
    from reportgen.work import parse_peak

    shards = []
    for start, end in p.shards:
        arrays = store.get_arrays(p.shard_key(start, end))
        if arrays is None:
            raise ReportgenError(f"dataset pass {p.model}/{p.dataset}: shard {start}:{end} is missing")
        shards.append((start, arrays))
    missing = np.asarray(
        sorted(int(i) + start for start, arrays in shards for i in arrays["missing"]), np.int64
    )
    stored = []
    for piece in p.peaks:  # the k best of the shards' k best: exact, ties by index in the pass
        stat, k, _ = parse_peak(piece)
        parts = []
        for start, arrays in shards:
            part = {f: arrays[f"{piece}.{f}"] for f in topk.FIELDS}
            part["index"] = np.where(part["index"] >= 0, part["index"] + start, -1)
            parts.append(part)
        store.put_arrays(p.pieces[piece], {**topk.merge(parts, k, stat == "topk"), "missing": missing})
        stored.append(p.pieces[piece])
    for piece in p.pending:
        if piece in p.peaks:
            continue
        name = "means" if piece.startswith("means:") else "outputs"
        rows = np.concatenate([arrays[piece] for _, arrays in shards], axis=0)
        store.put_arrays(p.pieces[piece], {name: rows, "missing": missing})
        stored.append(p.pieces[piece])
    for start, end in p.shards:  # the merged pieces hold everything now
        store.path(p.shard_key(start, end), "npz").unlink(missing_ok=True)
    return stored


@dataclass(frozen=True)
class DatasetShard:
    """One shard of a dataset pass, as plain data for a worker."""

    spec_path: str
    model: str
    dataset: str
    images: tuple[str, ...] | None
    pieces: tuple[tuple[str, str], ...]  # (piece, content key) of the pending pieces
    start: int
    end: int
    batch_size: int | None  # None: the worker sizes batches for its own device
    memory_share: float = 1.0
    threads: int | None = None


_WORKER_DATASETS: dict[tuple[str, str], Any] = {}


def _worker_dataset(spec: Any, spec_path: str, dataset: str) -> Any:
    """The dataset of a spec, scanned once per worker process."""
    from reportgen.datasets import DatasetRegistry

    if (spec_path, dataset) not in _WORKER_DATASETS:
        _WORKER_DATASETS[(spec_path, dataset)] = DatasetRegistry(spec).get(dataset)
    return _WORKER_DATASETS[(spec_path, dataset)]


def run_dataset_shard(shard: DatasetShard) -> dict[str, Any]:
    """Worker entry point: load spec, model and dataset, check the keys, compute and store one shard."""
    from reportgen.parallel import start_worker, worker_model

    spec = start_worker(shard.spec_path, shard.threads)
    from reportgen.device import device_description
    from reportgen.plan import device_budget, forward_batch_for, sample_cost, shard_key
    from reportgen.store import Store, store_root
    from reportgen.work import piece_key

    t0 = time.perf_counter()
    host = socket.gethostname()
    lm = worker_model(shard.spec_path, shard.model)
    ds = _worker_dataset(spec, shard.spec_path, shard.dataset)
    for piece, key in shard.pieces:
        mine = piece_key(lm, ds, piece, shard.images)
        if mine != key:
            raise ReportgenError(
                f"worker {host}: model {shard.model!r} or dataset {shard.dataset!r} of {shard.spec_path} is "
                f"not what the run planned with; every worker must see the same spec, model files, images "
                "and reportgen version at the same paths"
            )
    items = ds.items if shard.images is None else ds.select(list(shard.images))
    layers = tuple(piece[6:] for piece, _ in shard.pieces if piece.startswith("means:"))
    outputs = any(piece == "outputs" for piece, _ in shard.pieces)
    peaks = tuple(piece for piece, _ in shard.pieces if piece.startswith(("topk:", "bottomk:")))
    deepest = [*layers, *(piece.split(":", 2)[2] for piece in peaks)]
    deepest += [lm.model.layers[-1].name] if outputs else []
    batch = shard.batch_size or forward_batch_for(
        sample_cost(lm, deepest, lm.input_size), device_budget(shard.memory_share)
    )
    store = Store(store_root(spec))
    key = shard_key([k for _, k in shard.pieces], shard.start, shard.end)
    if not store.has(key, "npz"):  # a retried shard may be stored already
        arrays = compute_shard(lm, items[shard.start : shard.end], layers, outputs, batch, None, peaks)
        store.put_arrays(key, arrays)
    return {
        "key": key,
        "items": shard.end - shard.start,
        "pid": os.getpid(),
        "device": f"{host}: {device_description()}",
        "seconds": time.perf_counter() - t0,
    }


def _run_local(p: Any, lm: Any, store: Any, progress: Any) -> None:
    label = f"dataset {p.model} over {p.dataset}: {', '.join(p.pending)}"
    with progress.task(label, len(p.items)) as advance:
        for start, end in p.shards:
            key = p.shard_key(start, end)
            if store.has(key, "npz"):  # stored by a killed run
                advance(end - start)
                continue
            arrays = compute_shard(
                lm, p.items[start:end], p.layers, p.outputs, p.batch_size, advance, p.peaks
            )
            store.put_arrays(key, arrays)


def _run_parallel(
    passes: list[Any], store: Any, spec_path: Any, backend: Any, progress: Any, batch_size: int | None
) -> tuple[set[str], set[int]]:
    from joblib import Parallel, delayed

    if spec_path is None:
        raise ReportgenError("parallel runs need the spec's path: workers load the models from it")
    spec_path = str(os.path.abspath(spec_path))
    threads = max(1, (os.cpu_count() or 1) // backend.jobs) if backend.name == "loky" else None
    devices: set[str] = set()
    pids: set[int] = set()
    with progress.board() as board:
        advances = {}
        works = []
        for index, p in enumerate(passes):
            label = f"dataset {p.model} over {p.dataset} on {backend.describe()}"
            advances[index] = board.add(label, len(p.items))
            for start, end in p.shards:
                if store.has(p.shard_key(start, end), "npz"):
                    advances[index](end - start)
                    continue
                chunk = batch_size if backend.name == "dask" else p.batch_size
                pieces = tuple((piece, p.pieces[piece]) for piece in p.pending)
                shard = DatasetShard(
                    spec_path, p.model, p.dataset, p.images, pieces, start, end, chunk,
                    backend.memory_share, threads,
                )  # fmt: skip
                works.append((index, shard))
        results = Parallel(batch_size=1, return_as="generator_unordered")(
            delayed(_tagged)(index, shard) for index, shard in works
        )
        for index, res in results:
            advances[index](res["items"])
            devices.add(res["device"])
            pids.add(res["pid"])
    return devices, pids


def _tagged(index: int, shard: DatasetShard) -> tuple[int, dict[str, Any]]:
    return index, run_dataset_shard(shard)


def execute_dataset(
    passes: list[Any], ctx: Any, backend: Any = None, spec_path: Any = None, batch_size: int | None = None
) -> None:
    """Run every pending dataset pass (shards here or on the backend's workers), merge, store each piece.

    Every piece key of a pass is claimed meanwhile, so another run sharing the store waits for them
    instead of computing them too; pieces stored meanwhile are not recomputed."""
    from contextlib import ExitStack

    todo = [p for p in passes if p.pending]
    if not todo:
        return
    store, parallel = ctx.store, backend is not None and not backend.in_process
    with ExitStack() as stack:
        for p in todo:
            stack.enter_context(store.claim_all(p.pending_keys))
        todo = [p for p in todo if not all(store.has(k, "npz") for k in p.pending_keys)]
        if parallel:
            from reportgen.parallel import _joblib_backend
            from reportgen.plan import shard_ranges

            with _joblib_backend(backend) as workers:
                # the planner's cut (`plan_dataset`, with `Backend.planned_workers`): the same function of the
                # same worker count (`parallel.cluster_workers`), again in case the cluster changed meanwhile
                for p in todo:
                    p.shards = shard_ranges(len(p.items), workers)
                devices, pids = _run_parallel(todo, store, spec_path, backend, ctx.progress, batch_size)
            ctx.work.devices |= devices
            ctx.work.pids |= pids
        else:
            for p in todo:
                _run_local(p, ctx.models.get(p.model), store, ctx.progress)
            ctx.work.pids.add(os.getpid())
        for p in todo:
            ctx.work.fresh.update(merge_shards(p, store))


def activation_maps(
    lm: Any,
    ds: Any,
    items: list[Any],
    request: Any,
    batch: int,
    on_batch: Callable[[int], None],
    start: int = 0,
) -> dict[str, np.ndarray]:
    """The arrays of one activations request (`reportgen.engine.activation_maps.ActivationProgram.run`);
    `items` may be a shard of the request's images (its first at `start`): every array is per image."""
    from reportgen.engine.activation_maps import activation_program

    params = dict(request.params)
    program = activation_program(lm, request.layers, params["shown"], params["map_size"])
    return with_backoff(lambda b: program.run(items, b, on_batch), batch, f"activations {request.model}")


def pixel_engine(
    lm: Any,
    ds: Any,
    items: list[Any],
    request: Any,
    batch: int,
    on_batch: Callable[[int], None],
    start: int = 0,
) -> dict[str, np.ndarray]:
    """The arrays of one gradient request (Grad-CAM, saliency, occlusion, sanity, ...): the decoded images,
    which of them decoded, and what the request's engine function computes from their pixels.

    `request.engine` names that function as "module.function" inside `reportgen.engine` (e.g.
    "gradient_batches.gradcam"), so a new analysis brings its engine without a list to edit here. Every such
    function is `(model, pixels (N, H, W, C), ids, params, batch) -> arrays`: `ids` is each decoded image's
    index in the request's chosen images, which seeds per-image noise and picks an image's occlusion masks,
    so a shard of the images (`items`, the first at `start`) computes what one run over all would."""
    from reportgen.engine.gradient_batches import as_uint8, load_inputs

    params = dict(request.params)
    pixels, kept = load_inputs(lm, ds, items, params["where"])
    compute = engine_function(request.engine)
    what = f"{engine_label(request)} {request.model}"
    arrays = with_backoff(lambda b: compute(lm, pixels, kept + start, params, b), batch, what)
    on_batch(len(items))
    return {"images": as_uint8(pixels), "kept": kept, **arrays}


def engine_function(name: str) -> Callable[..., dict[str, np.ndarray]]:
    """The function "module.function" of `reportgen.engine` a gradient request names (imported only when a
    request runs: engine modules import TensorFlow)."""
    module, _, function = name.rpartition(".")
    return getattr(importlib.import_module(f"reportgen.engine.{module}"), function)


def engine_label(request: Any) -> str:
    """What progress lines and errors call a request's work: its engine function's name ("gradcam")."""
    return request.engine.rpartition(".")[2]


def image_engine(request: Any) -> Callable[..., dict[str, np.ndarray]]:
    """The call that computes one image request, or a shard of its images: (model, dataset, images, request,
    batch, on_batch, start) -> the arrays its section reads. Activation maps stream their images through
    one program; every other kind works on decoded pixels."""
    return activation_maps if request.kind == "activations" else pixel_engine


# How shards' arrays merge: indices of decoded images in the request ("kept", "index") are shifted by the
# shard's start, indices into the decoded images ("pair_image") by the decoded images of earlier shards,
# arrays that do not depend on the images are taken once; every other array is per image (or per pair) and
# is concatenated in shard order. Rows are copied, never recomputed: the merge is exact.
ITEM_INDEX = ("kept", "index")
DECODED_INDEX = ("pair_image",)
SAME = ("patch_boxes",)


def merge_image_shards(shards: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """One request's arrays from its shards' (start, arrays), in image order; shards none of whose images
    decoded hold no arrays and are left out (at least one must hold some)."""
    shards = [(start, arrays) for start, arrays in shards if set(arrays) - {"pid"}]
    decoded, before = 0, []
    for _, arrays in shards:
        before.append(decoded)
        decoded += len(next(arrays[k] for k in ITEM_INDEX if k in arrays))
    merged: dict[str, np.ndarray] = {}
    for name in shards[0][1]:
        parts = [arrays[name] for _, arrays in shards]
        if name == "pid":
            continue
        if name in SAME or name.startswith("shape_"):
            merged[name] = parts[0]
        elif name in ITEM_INDEX:
            merged[name] = np.concatenate([a + start for (start, _), a in zip(shards, parts, strict=True)])
        elif name in DECODED_INDEX:
            merged[name] = np.concatenate([a + b for b, a in zip(before, parts, strict=True)])
        else:
            merged[name] = np.concatenate(parts, axis=0)
    return merged


def image_shard_key(lm: Any, ds: Any, request: Any, start: int, end: int) -> str:
    """Key of one shard's partial arrays, from what the worker loads itself: the model's weights and
    preprocessing, the dataset's files, the request (its key, engine, images, parameters) and the range.
    A worker that computes another key has other weights, files or code, and refuses the shard."""
    from reportgen.store import content_key

    params = [(k, v) for k, v in request.params if k != "where"]  # `where` only locates errors
    return content_key(
        "image-shard", request.key, lm.digest, lm.preprocessing.model_dump(), lm.channels, lm.input_size,
        ds.digest, request.engine, request.layers, list(request.names), params, start, end,
    )  # fmt: skip


@dataclass(frozen=True)
class ImageShard:
    """One shard (an image range) of an image request that names an engine, as plain data for a worker."""

    spec_path: str
    request: Any  # reportgen.work.ImageRequest: strings, numbers and tuples of them
    key: str  # the host's image_shard_key
    start: int
    end: int
    batch_size: int | None  # None: the worker sizes batches for its own device
    memory_share: float = 1.0
    threads: int | None = None


def run_image_shard(shard: ImageShard) -> dict[str, Any]:
    """Worker entry point: load spec, model and dataset, check the key, compute and store one shard."""
    from reportgen.parallel import start_worker, worker_model

    spec = start_worker(shard.spec_path, shard.threads)
    from reportgen.device import device_description
    from reportgen.store import Store, store_root

    t0 = time.perf_counter()
    host = socket.gethostname()
    req = shard.request
    lm = worker_model(shard.spec_path, req.model)
    ds = _worker_dataset(spec, shard.spec_path, req.dataset)
    if image_shard_key(lm, ds, req, shard.start, shard.end) != shard.key:
        raise ReportgenError(
            f"worker {host}: model {req.model!r} or dataset {req.dataset!r} of {shard.spec_path} is not what "
            "the run planned with; every worker must see the same spec, model files, images and reportgen "
            "version at the same paths"
        )
    store = Store(store_root(spec))
    if not store.has(shard.key, "npz"):  # a retried shard may be stored already
        items = ds.select(list(req.names))[shard.start : shard.end]
        batch = shard.batch_size or _worker_batch(lm, req, shard.memory_share, spec.precision)
        engine = image_engine(req)
        try:
            arrays = engine(lm, ds, items, req, batch, lambda n: None, shard.start)
        except NothingDecodedError:
            if shard.end - shard.start == req.images:
                raise
            arrays = {}  # other shards may hold images; the host says so when none does
        store.put_arrays(shard.key, {**arrays, "pid": np.asarray(os.getpid(), np.int64)})
    return {
        "key": shard.key,
        "items": shard.end - shard.start,
        "pid": os.getpid(),
        "device": f"{host}: {device_description()}",
        "seconds": time.perf_counter() - t0,
    }


def _worker_batch(lm: Any, request: Any, memory_share: float, precision: str) -> int:
    """The batch the planner would give the request on this worker's device (`reportgen.plan`)."""
    from reportgen.plan import batch_size_for, device_budget, forward_batch_for, sample_cost

    cost = sample_cost(lm, list(request.layers), lm.input_size, precision)
    size = batch_size_for if request.backward else forward_batch_for
    return size(cost, device_budget(memory_share))


# the timing row of each kind in the report's metadata (gradient work shares Grad-CAM's)
TIMERS = {"activations": "engine: activations", "gradient": "engine: gradients"}


def _engine_requests(passes: list[Any]) -> list[tuple[Any, str, Any]]:
    """(pass, section id, request) of every request that names an engine and is not stored."""
    return [(p, sid, r) for p in passes for sid, r in p.requests if r.engine and r.key not in p.stored]


def execute_images(
    passes: list[Any], ctx: Any, backend: Any = None, spec_path: Any = None, batch_size: int | None = None
) -> None:
    """Compute and store every pending request of the image passes that names an engine: here, or, with a
    parallel backend, as shards of image ranges (at least one per worker) on the backend's workers,
    merged here into each request's arrays. Dask workers size their own batches for their device unless
    `batch_size` (--batch-size) is given; local processes take the planned batch.

    Each key is claimed while it is computed, so another run sharing the store waits for it instead of
    computing it too; a key stored meanwhile is not recomputed."""
    store = ctx.store
    if backend is not None and not backend.in_process and _engine_requests(passes):
        _images_parallel(passes, ctx, backend, spec_path, batch_size)
        return
    for p, sid, req in _engine_requests(passes):
        with store.claim(req.key):
            if store.has(req.key, "npz"):
                continue
            lm, ds = ctx.models.get(req.model), ctx.datasets.get(req.dataset)
            items = ds.select(list(req.names))
            timer = ctx.timed(TIMERS.get(p.kind, f"engine: {p.kind}"))
            with timer, ctx.progress.task(f"{engine_label(req)} {sid}", len(items)) as advance:
                arrays = image_engine(req)(lm, ds, items, req, p.batch_size, advance)
            store.put_arrays(req.key, arrays)
        ctx.work.fresh.add(req.key)


def _images_parallel(
    passes: list[Any], ctx: Any, backend: Any, spec_path: Any, batch_size: int | None
) -> None:
    from contextlib import ExitStack

    from joblib import Parallel, delayed

    from reportgen.parallel import _joblib_backend
    from reportgen.plan import shard_ranges

    if spec_path is None:
        raise ReportgenError("parallel runs need the spec's path: workers load the models from it")
    spec_path = str(os.path.abspath(spec_path))
    threads = max(1, (os.cpu_count() or 1) // backend.jobs) if backend.name == "loky" else None
    store = ctx.store
    with ExitStack() as stack:
        todo = _engine_requests(passes)
        stack.enter_context(store.claim_all([r.key for _, _, r in todo]))
        todo = [(p, sid, r) for p, sid, r in todo if not store.has(r.key, "npz")]
        with _joblib_backend(backend) as workers, ctx.timed("engine: images on workers"):
            with ctx.progress.board() as board:
                shards, advances = [], []
                for index, (p, sid, req) in enumerate(todo):
                    label = f"{engine_label(req)} {sid} on {backend.describe()}"
                    advances.append(board.add(label, req.images))
                    lm, ds = ctx.models.get(req.model), ctx.datasets.get(req.dataset)
                    ranges = shard_ranges(req.images, workers)
                    keys = [image_shard_key(lm, ds, req, s, e) for s, e in ranges]
                    p.shard_keys[req.key] = list(zip(ranges, keys, strict=True))
                    for (start, end), key in p.shard_keys[req.key]:
                        if store.has(key, "npz"):  # stored by a killed run
                            advances[index](end - start)
                            continue
                        chunk = batch_size if backend.name == "dask" else p.batch_size
                        shard = ImageShard(
                            spec_path, req, key, start, end, chunk, backend.memory_share, threads
                        )
                        shards.append((index, shard))
                results = Parallel(batch_size=1, return_as="generator_unordered")(
                    delayed(_tagged_image)(index, shard) for index, shard in shards
                )
                for index, res in results:
                    advances[index](res["items"])
                    ctx.work.devices.add(res["device"])
                    ctx.work.pids.add(res["pid"])
        for p, sid, req in todo:
            parts = []
            for (start, end), key in p.shard_keys[req.key]:
                arrays = store.get_arrays(key)
                if arrays is None:
                    raise ReportgenError(f"{engine_label(req)} {req.model}: shard {start}:{end} is missing")
                parts.append((start, arrays))
            if not any(set(arrays) - {"pid"} for _, arrays in parts):
                where = dict(req.params).get("where", f"section {sid}")
                raise NothingDecodedError(
                    f"{where}: none of the {req.images} selected images of dataset {req.dataset!r} could be "
                    "decoded; check the files or pick others with `images:`"
                )
            store.put_arrays(req.key, merge_image_shards(parts))
            for _, key in p.shard_keys[req.key]:  # the merged arrays hold everything now
                store.path(key, "npz").unlink(missing_ok=True)
            ctx.work.fresh.add(req.key)


def _tagged_image(index: int, shard: ImageShard) -> tuple[int, dict[str, Any]]:
    return index, run_image_shard(shard)
