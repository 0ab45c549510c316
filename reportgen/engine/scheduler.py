"""Whole-spec scheduling of activation-maximization work.

Sections only register what they need. Before anything runs, requests from all sections are merged per
model and recipe, de-duplicated by content key, and those already in the store are dropped; the rest
run in one program per group, whose layer set is the union of the group's layers (one extractor with an
output at each layer; each sample's objective picks its own layer and channel).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from reportgen.engine.recipes import Recipe
from reportgen.store import Store, content_key

ASCENT_CODE_VERSION = "ascent-1"


@dataclass(frozen=True)
class AscentRequest:
    model: str
    layer: str
    filter: int
    recipe: Recipe
    seed: int


class AscentScheduler:
    def __init__(self, store: Store, models: Any, precision: str = "float32", batch_size: int = 16):
        self.store, self.models, self.precision, self.batch_size = store, models, precision, batch_size
        self.requests: dict[AscentRequest, str] = {}
        self.computed = 0
        self.reused = 0
        self.seconds = 0.0

    def key(self, req: AscentRequest) -> str:
        lm = self.models.get(req.model)
        from reportgen.engine.ascent import ascent_size

        return content_key(
            ASCENT_CODE_VERSION, lm.digest, lm.preprocessing.model_dump(), req.layer, req.filter,
            req.recipe.as_dict(), req.seed, ascent_size(lm, req.recipe), self.precision,
        )

    def request(self, req: AscentRequest) -> None:
        if req not in self.requests:
            self.requests[req] = self.key(req)

    def pending(self) -> dict[tuple[str, Recipe], list[AscentRequest]]:
        """Requests not in the store, grouped by (model, recipe): one compiled program per group."""
        groups: dict[tuple[str, Recipe], dict[str, AscentRequest]] = defaultdict(dict)
        for req, key in self.requests.items():
            if not self.store.has(key, "json"):
                groups[(req.model, req.recipe)].setdefault(key, req)
        return {g: list(reqs.values()) for g, reqs in groups.items()}

    def execute(self, progress: Any) -> None:
        from reportgen.engine.ascent import AscentJob, program_for

        todo = self.pending()
        total = sum(len(v) for v in todo.values())
        self.reused = len(set(self.requests.values())) - total
        t0 = time.perf_counter()
        for (model_key, recipe), reqs in todo.items():
            lm = self.models.get(model_key)
            layers = sorted({r.layer for r in reqs}, key=[ly.name for ly in lm.model.layers].index)
            program = program_for(lm, layers, recipe, self.precision)
            jobs = [AscentJob(r.layer, r.filter, r.seed) for r in reqs]
            with progress.task(f"ascent {model_key} ({len(layers)} layers)", len(jobs)) as advance:
                # store each chunk as it finishes, so a killed run resumes from it
                for start in range(0, len(jobs), self.batch_size):
                    chunk = jobs[start : start + self.batch_size]
                    for req, res in zip(reqs[start : start + self.batch_size], program.run(chunk, self.batch_size),
                                        strict=True):
                        key = self.requests[req]
                        self.store.put_png(key, res.image)
                        self.store.put_npy(key, res.raw.astype(np.float16))
                        self.store.put_json(key, {
                            "activation": res.activation, "initial_activation": res.initial_activation,
                            "dead": res.dead,
                        })
                    advance(len(chunk))
            self.computed += len(jobs)
        self.seconds = time.perf_counter() - t0

    def result(self, req: AscentRequest) -> tuple[Any, dict[str, Any]]:
        """(path of the PNG in the store, metrics) of a request after `execute`."""
        key = self.requests[req]
        meta = self.store.get_json(key)
        if meta is None:
            raise KeyError(f"ascent result missing for {req}")
        return self.store.path(key, "png"), meta
