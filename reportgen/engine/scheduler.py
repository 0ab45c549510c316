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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from reportgen.engine.recipes import Recipe, ascent_size
from reportgen.store import Store, content_key

# Bump when the ascent's numbers change, so that stored results are recomputed. ascent-2: host-side
# augmentation transforms and exact-sqrt gradient normalisation (batch-invariant), channel picked first.
# ascent-3: objectives, diversity, Fourier parameterisations; quality figures stored with each result.
# ascent-4: starts seeded by the spec's model key instead of the weights digest (`ascent.sample_seed`).
ASCENT_CODE_VERSION = "ascent-4"


@dataclass(frozen=True)
class AscentRequest:
    model: str
    layer: str
    filter: int
    recipe: Recipe
    seed: int
    objective: str = "channel"  # see reportgen.engine.ascent.AscentJob
    position: tuple[int, int] | None = None
    direction: tuple[float, ...] | None = None
    variant: int = 0
    diversity: int = 1

    def job(self) -> Any:
        from reportgen.engine.ascent import AscentJob

        return AscentJob(
            self.layer, self.filter, self.seed, self.objective, self.position, self.direction,
            self.variant, self.diversity,
        )  # fmt: skip


def ascent_key(
    lm: Any, layer: str, filt: int, recipe: Recipe, seed: int, precision: str, unit: tuple[Any, ...] = ()
) -> str:
    """Content key of one ascent result; cluster workers recompute it to check they see the same model.
    `unit`: (objective, position, direction, variant, diversity) when not the default channel objective."""
    return content_key(
        *unit,
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


def store_result(store: Store, key: str, res: Any) -> None:
    """PNG, raw array, then the metrics JSON: the JSON is what marks the result as present."""
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
    store.put_json(key, meta)


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
        lm = self.models.get(req.model)
        unit = (req.objective, req.position, req.direction, req.variant, req.diversity)
        default = unit == ("channel", None, None, 0, 1)
        return ascent_key(
            lm, req.layer, req.filter, req.recipe, req.seed, self.precision, () if default else unit
        )

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

    def plan(self, memory_share: float = 1.0) -> Any:
        """The passes that `execute` would run now (reportgen.plan.Plan)."""
        from reportgen.plan import build_plan, device_budget

        return build_plan(
            self.requests,
            self.owners,
            self.store,
            self.models,
            self.precision,
            self.batch_size,
            device_budget(memory_share),
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
        from reportgen.engine.ascent import chunk_ranges, program_for

        lm = self.models.get(p.model)
        program = program_for(lm, p.layers, p.recipe, self.precision)
        jobs = [r.job() for r in p.requests]
        layers = f"{len(p.layers)} layer{'s' if len(p.layers) != 1 else ''}"
        label = f"ascent {p.model} ({layers}, {p.recipe.steps} steps)"
        with progress.task(label, len(jobs)) as advance:
            # store each chunk as it finishes, so a killed run resumes from it; claim its keys first, so a
            # run of another spec sharing the store waits for them instead of computing them too
            for start, end in chunk_ranges(jobs, p.batch_size):
                keys = p.keys[start:end]
                with self.store.claim_all(keys):
                    missing = {
                        jobs[start + i].group for i, key in enumerate(keys) if not self.store.has(key, "json")
                    }
                    # a diversity group is optimised together: one missing variant recomputes them all
                    todo = [i for i in range(len(keys)) if jobs[start + i].group in missing]
                    if skipped := len(keys) - len(todo):  # stored by that other run meanwhile
                        self.reused += skipped
                        advance(skipped)
                    if not todo:
                        continue
                    chunk = [jobs[start + i] for i in todo]
                    results = program.run(chunk, p.batch_size, on_chunk=advance)
                    for i, res in zip(todo, results, strict=True):
                        store_result(self.store, keys[i], res)
                        self.computed_keys.add(keys[i])

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
