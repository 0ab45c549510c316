"""Whole-spec scheduling of activation-maximization work.

Sections only register what they need. Before anything runs, requests from all sections are merged per
model and recipe, de-duplicated by content key, and those already in the store are dropped; the rest
run in one program per group, whose layer set is the union of the group's layers (one extractor with an
output at each layer; each sample's objective picks its own layer and channel). See `reportgen.plan`.

Every result is stored under a content key of everything that determines it (model weights digest,
preprocessing, layer, filter, recipe, seed, input size, precision, code version), chunk by chunk as the
pass goes, so an unchanged rerun computes nothing and a killed run resumes from its last finished chunk.
The scheduler also remembers which section asked for which key, for the report's per-section counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from reportgen.engine.recipes import Recipe, ascent_size
from reportgen.store import Store, content_key
from reportgen.work import CLASS_TAG, AscentRequest

# Bump when the ascent's numbers change, so that stored results are recomputed. ascent-2: host-side
# augmentation transforms and exact-sqrt gradient normalisation (batch-invariant), channel picked first.
# ascent-3: objectives, diversity, Fourier parameterisations; quality figures stored with each result.
# ascent-4: starts seeded by the spec's model key instead of the weights digest (`ascent.sample_seed`).
ASCENT_CODE_VERSION = "ascent-4"


def unit_revision(lm: Any, recipe: Recipe, unit: tuple[Any, ...]) -> tuple[str, ...]:
    """A mark for results whose numbers changed without a version bump, which would recompute all of them:
    a `neuron` at a given position on a fixed-size model with `pad` reads another cell since issue 9
    (`ascent.zoomed_cell`)."""
    if unit[:1] != ("neuron",) or unit[1] is None:
        return ()
    return ("zoomed-cell",) if lm.fixed_input and recipe.pad and not recipe.crops else ()


def ascent_key(
    lm: Any, layer: str, filt: int, recipe: Recipe, seed: int, precision: str, unit: tuple[Any, ...] = ()
) -> str:
    """Content key of one ascent result; cluster workers recompute it to check they see the same model.
    `unit`: (objective, position, direction, variant, diversity) when not the default channel objective."""
    return content_key(
        *unit,
        *unit_revision(lm, recipe, unit),
        ASCENT_CODE_VERSION,
        lm.digest,
        lm.preprocessing.model_dump(),
        layer,
        filt,
        recipe.as_dict(),
        seed,
        ascent_size(lm, recipe),
        precision,
    )


def request_key(lm: Any, req: AscentRequest, precision: str) -> str:
    """Content key of a request's result: the planner's and, recomputed, every cluster worker's."""
    if req.layer == CLASS_TAG:
        unit: tuple[Any, ...] = ("class",)
    else:
        unit = (req.objective, req.position, req.direction, req.variant, req.diversity)
        unit = () if unit == ("channel", None, None, 0, 1) else unit
    return ascent_key(lm, req.layer, req.filter, req.recipe, req.seed, precision, unit)


def store_result(store: Store, key: str, res: Any) -> None:
    """PNG, raw array, then the metrics JSON: the JSON is what marks the result as present. A class
    model's result also stores the model's softmax on its image and its logits at start and end."""
    store.put_png(key, res.image)
    store.put_npy(key, res.raw.astype(np.float16))
    meta = {
        "activation": res.activation,
        "initial_activation": res.initial_activation,
        "dead": res.dead,
        "hf_energy": res.hf_energy,
        "robustness": res.robustness,
    }
    if res.mask is not None:  # MaCo's transparency: stored under the result's key with a suffix
        store.put_npy(key + "-mask", res.mask.astype(np.float32))
        meta["mask"] = True
    if getattr(res, "probs", None) is not None:
        store.put_arrays(key, {"probs": res.probs.astype(np.float32)})
        meta.update(logit_start=res.logit_start, logit_final=res.logit_final)
    store.put_json(key, meta)


def pass_program(lm: Any, layers: tuple[str, ...], recipe: Recipe, precision: str) -> Any:
    """The compiled program of a pass: the class-model loop for a pass of class models, else the filter
    ascent over the pass's layers (both cached on the model)."""
    if layers == (CLASS_TAG,):
        from reportgen.engine.class_model import class_model_program

        return class_model_program(lm, recipe, precision)
    from reportgen.engine.ascent import program_for

    return program_for(lm, layers, recipe, precision)


def run_chunks(
    store: Store,
    program: Any,
    requests: list[AscentRequest],
    keys: list[str],
    batch: int,
    advance: Callable[[int], None],
) -> tuple[list[str], int]:
    """The ascent's chunk loop, here and on cluster workers: chunks of at most `batch` samples (never
    splitting a `diversity` group), each claimed, computed and stored as it finishes, so a killed run
    resumes from it and a run of another spec sharing the store waits for its keys instead of computing
    them too. Returns (keys computed, results found stored meanwhile)."""
    from reportgen.engine.ascent import chunk_ranges

    jobs = [r.job() for r in requests]
    classes = requests and requests[0].layer == CLASS_TAG
    computed: list[str] = []
    reused = 0
    for start, end in chunk_ranges(jobs, batch):
        chunk_keys = keys[start:end]
        with store.claim_all(chunk_keys):
            missing = {jobs[start + i].group for i, k in enumerate(chunk_keys) if not store.has(k, "json")}
            # a diversity group is optimised together: one missing variant recomputes them all
            todo = [i for i in range(len(chunk_keys)) if jobs[start + i].group in missing]
            if skipped := len(chunk_keys) - len(todo):  # stored by another run or worker meanwhile
                reused += skipped
                advance(skipped)
            if not todo:
                continue
            chunk = [jobs[start + i] for i in todo]
            run = program.run_classes if classes else program.run
            results = run(chunk, batch, on_chunk=advance)
            for i, res in zip(todo, results, strict=True):
                store_result(store, chunk_keys[i], res)
                computed.append(chunk_keys[i])
    return computed, reused


class AscentScheduler:
    """Collects ascent requests of all sections, plans them (`plan`) and runs them (`execute`).

    `batch_size`: samples per chunk; None sizes chunks from the device's free memory (`reportgen.plan`)."""

    def __init__(self, store: Store, models: Any, precision: str = "float32", batch_size: int | None = None):
        self.store, self.models, self.precision, self.batch_size = store, models, precision, batch_size
        self.requests: dict[AscentRequest, str] = {}
        self.owners: dict[str, list[str]] = {}  # section id -> keys it asked for
        self.computed = 0
        self.reused = 0
        self.seconds = 0.0
        self.computed_keys: set[str] = set()
        self.devices: set[str] = set()  # where passes ran (cluster workers report theirs)
        self._section: str | None = None

    def key(self, req: AscentRequest) -> str:
        return request_key(self.models.get(req.model), req, self.precision)

    @contextmanager
    def section(self, sid: str) -> Iterator[None]:
        """Requests made inside are counted for section `sid` in the report's metadata."""
        previous, self._section = self._section, sid
        try:
            yield
        finally:
            self._section = previous

    def request(self, req: AscentRequest) -> None:
        if req not in self.requests:
            self.requests[req] = self.key(req)
        if self._section is not None:
            self.owners.setdefault(self._section, []).append(self.requests[req])

    def pending(self) -> dict[tuple[str, Recipe], list[AscentRequest]]:
        """Requests not in the store, grouped by (model, recipe): one compiled program per group."""
        seen: set[str] = set()
        groups: dict[tuple[str, Recipe], list[AscentRequest]] = {}
        for req, key in self.requests.items():
            if key not in seen and not self.store.has(key, "json"):
                groups.setdefault((req.model, req.recipe), []).append(req)
            seen.add(key)
        return groups

    def plan(self, memory_share: float = 1.0, workers: int = 1) -> Any:
        """The passes that `execute` would run now (reportgen.plan.Plan); `workers` of a parallel backend."""
        from reportgen.plan import build_plan, device_budget

        return build_plan(
            self.requests,
            self.owners,
            self.store,
            self.models,
            self.precision,
            self.batch_size,
            device_budget(memory_share),
            workers,
        )

    def execute(self, progress: Any, backend: Any = None, spec_path: Any = None) -> None:
        """Run every pending pass: here, or with a `reportgen.parallel.Backend` on local processes or a
        Dask cluster (workers load the model from `spec_path` themselves and write to the same store)."""
        parallel = backend is not None and not backend.in_process
        plan = self.plan(memory_share=backend.memory_share if parallel else 1.0)
        self.reused = plan.stored
        t0 = time.perf_counter()
        todo = [p for p in plan.passes if p.pending]
        for p in plan.passes:
            if not p.pending:
                progress.info(f"{p.describe()}; nothing to compute")
        if parallel:
            done, devices = backend.run_passes(todo, spec_path, self.precision, progress, self.batch_size)
            self.computed_keys |= done
            self.devices |= devices
        else:
            for p in todo:
                self._run_pass(p, progress)
            if todo:
                from reportgen.device import device_description

                self.devices.add(device_description())
        self.computed = len(self.computed_keys)
        self.seconds = time.perf_counter() - t0

    def _run_pass(self, p: Any, progress: Any) -> None:
        lm = self.models.get(p.model)
        program = pass_program(lm, p.layers, p.recipe, self.precision)
        with progress.task(p.label(), p.pending) as advance:
            done, reused = run_chunks(self.store, program, p.requests, p.keys, p.batch_size, advance)
        self.computed_keys.update(done)
        self.reused += reused

    def section_counts(self) -> dict[str, tuple[int, int]]:
        """Section id -> (results computed in this run, results taken from the store). A result that
        two sections share counts for both; the run's totals count it once."""
        out = {}
        for sid, keys in self.owners.items():
            unique = set(keys)
            computed = len(unique & self.computed_keys)
            out[sid] = (computed, len(unique) - computed)
        return out

    def result(self, req: AscentRequest) -> tuple[Any, dict[str, Any]]:
        """(path of the PNG in the store, metrics) of a request after `execute`."""
        key = self.requests[req]
        meta = self.store.get_json(key)
        if meta is None:
            raise KeyError(f"ascent result missing for {req}")
        return self.store.path(key, "png"), meta
