"""`reportgen run`: spec -> plan -> batched execution -> result store -> report, published atomically.

Nothing is written to the output folder until the whole report is built: the run works in a staging
folder beside it and swaps it in at the end, so a failed or killed run leaves the previous report in
place; the store keeps every result already computed, so the next run resumes from there.

All sections register their work first (`prepare`); the planner (`reportgen.plan.plan_work`) then plans
every kind of pass of the whole spec; the ascent scheduler and the executor (`reportgen.execute`: dataset
passes, activation maps, saliency, occlusion) run them here, on local processes or on a Dask cluster
(`reportgen.parallel`), before any section builds. A dry run stops after planning and takes no lock.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reportgen.analyses import analysis_for
from reportgen.analyses.base import RunContext, SectionOutput, slugify
from reportgen.datasets import DatasetRegistry, dataset_notes
from reportgen.device import device_description, select_cpu_kernels
from reportgen.engine.scheduler import AscentScheduler
from reportgen.errors import SpecError
from reportgen.execute import execute_dataset, execute_images
from reportgen.history import RunRecord, history_path, item_rows, record_run
from reportgen.history.changes import manifest_items, prepare_baseline, run_changes
from reportgen.history.trends import add_to_manifest as add_trends
from reportgen.history.trends import trend_charts
from reportgen.models import ModelRegistry
from reportgen.parallel import Backend
from reportgen.plan import check_samples_fit, plan_work
from reportgen.progress import Progress, log
from reportgen.publish import clean_stale, new_staging, publish, run_lock
from reportgen.report.context import now, report_context, run_meta, section_entry, write_manifest
from reportgen.report.render import render_html, render_pdf
from reportgen.spec.files import check_files
from reportgen.spec.load import load_spec, locate, spec_sha256
from reportgen.spec.schema import Spec
from reportgen.store import Store, create_store_root, store_root
from reportgen.unchanged import Memo, ModelFacts, copy_files, file_digests, fingerprint, reusable
from reportgen.unchanged import save as save_memo

EXIT_OK, EXIT_FAILED, EXIT_SPEC, EXIT_LOCKED = 0, 1, 2, 3


@dataclass
class RunSummary:
    output: Path
    passes: list[dict[str, Any]] = field(default_factory=list)  # the plan for machines (--dry-run --json)
    pages: int = 0
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    plan: list[str] = field(default_factory=list)
    to_compute: int = 0  # ascent results the plan had to compute (0: everything was stored)
    sections: dict[str, dict[str, int]] = field(default_factory=dict)  # title -> computed, reused
    device: str = ""
    run_id: str = ""  # the run's id in the run history (reportgen.history); empty for a dry run


def run(
    spec_path: str | Path,
    *,
    quiet: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    jobs: int = 1,
    backend: str = "loky",
    scheduler: str | None = None,
    batch_size: int | None = None,
) -> RunSummary:
    """Run a spec. `jobs`/`backend`/`scheduler`: where independent passes run (reportgen.parallel);
    `batch_size`: samples per chunk instead of sizing chunks from free memory."""
    t_start = time.perf_counter()
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    engine = Backend(backend, jobs, scheduler)
    select_cpu_kernels(spec)
    progress = progress or Progress(quiet=quiet)
    output = Path(spec.output)
    summary = RunSummary(output=output)
    if dry_run:  # reads the store, writes nothing: no lock, so it works while a run is going
        with tempfile.TemporaryDirectory(prefix="reportgen-dry-run-") as tmp:
            root = store_root(spec)  # not created if absent: then nothing is stored yet
            ctx, _ = _prepare(
                spec,
                spec_path,
                Path(tmp),
                progress,
                batch_size,
                root if root.exists() else Path(tmp) / "store",
            )
            work = plan_work(ctx, engine.memory_share, batch_size, engine.planned_workers)
            check_samples_fit(spec, ctx.models, work.ascent.budget)
            summary.plan, summary.to_compute, summary.passes = work.lines(), work.pending, work.rows()
        summary.seconds = time.perf_counter() - t_start
        return summary
    options = {"jobs": jobs, "backend": backend, "scheduler": scheduler, "batch_size": batch_size}
    with run_lock(output):
        clean_stale(output)
        create_store_root(spec)
        staging = new_staging(output)
        started = now()
        try:
            datasets = DatasetRegistry(spec)  # scanned once: for the fingerprint and, if needed, the run
            inputs = fingerprint(spec, spec_path, options, datasets)  # before TensorFlow is imported
            memo = reusable(spec, spec_path, inputs, output) if inputs else None
            if memo is not None:
                record = _run_unchanged(spec, spec_path, staging, progress, summary, memo)
            else:
                record = _run_locked(spec, spec_path, staging, progress, engine, batch_size, summary, inputs,
                                     datasets)  # fmt: skip
            publish(staging, output, where=locate(spec, ("output",)))
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            _record_failure(spec, spec_path, started, exc)
            raise
        summary.run_id = record_run(history_path(spec), record)  # a published run is an "ok" one
    summary.seconds = time.perf_counter() - t_start
    log.debug("run finished in %.1fs", summary.seconds)
    return summary


def _record_failure(spec: Spec, spec_path: Path, started: str, exc: BaseException) -> None:
    """Record a run that got its lock but published nothing as status "failed" with no items, so the
    history shows the failed nights while `baseline: previous` (the last run with status "ok") still means
    the last successful one. A spec refused by its checks (exit 2, before any compute) never ran and
    leaves nothing behind, not even a history. A history that cannot be written then is only logged: the
    run's own error is the one line the user must see."""
    if isinstance(exc, SpecError):
        return
    try:
        record = RunRecord(started, now(), str(spec_path.resolve()), spec_sha256(spec_path),
                           str(Path(spec.output).resolve()), status="failed")  # fmt: skip
        record_run(history_path(spec), record)
    except Exception as why:  # noqa: BLE001 - never hide the run's own failure behind the history's
        log.debug("could not record the failed run (%s) in the history: %s", type(exc).__name__, why)


def _prepare(
    spec: Spec,
    spec_path: Path,
    staging: Path,
    progress: Progress,
    batch_size: int | None,
    root: Path | None = None,
    datasets: DatasetRegistry | None = None,
) -> tuple[Any, list[tuple[Any, Any, str, str, dict[str, int]]]]:
    """The run context, and every section's (section, analysis, title, id, result counts) after `prepare`
    registered its batched work."""
    store = Store(root or store_root(spec))
    models = ModelRegistry(spec)
    datasets = datasets or DatasetRegistry(spec)
    check_files(spec, models, datasets)  # every file the spec names, before any compute: exit 2 at its line
    ctx = RunContext(
        spec=spec,
        spec_path=spec_path,
        store=store,
        staging=staging,
        models=models,
        datasets=datasets,
        ascent=AscentScheduler(store, models, spec.precision, batch_size),
        progress=progress,
        batch_size=batch_size or RunContext.batch_size,
    )
    titled = []
    for i, section in enumerate(spec.sections):
        analysis = analysis_for(section.type)
        title = section.title or analysis.default_title(section)
        sid = f"s{i + 1}-{slugify(title)}"
        counts = {"computed": 0, "reused": 0}
        with ctx.timed(sid), ctx.ascent.section(sid), ctx.work.section(sid), _counting(ctx, counts):
            analysis.prepare(section, ctx, i)
        titled.append((section, analysis, title, sid, counts))
    prepare_baseline(spec, ctx)  # a baseline folder is checked, and `align:` plans its dataset passes
    return ctx, titled


@contextmanager
def _counting(ctx: Any, counts: dict[str, int]) -> Iterator[None]:
    """Add the results an analysis computes or reuses through `ctx.cached` meanwhile to `counts`."""
    computed, reused = ctx.computed, ctx.reused
    try:
        yield
    finally:
        counts["computed"] += ctx.computed - computed
        counts["reused"] += ctx.reused - reused


def ascent_shares(plan: Any, owners: dict[str, list[str]], seconds: float) -> dict[str, float]:
    """The ascent time attributed to each section: every pass's samples cost their FLOPs times the steps of
    the pass's recipe, a sample two sections share counts half for each, and the measured time of all
    passes is split in proportion. Passes run batched across sections, so this is the only fair way to
    say what a section cost (without it, a section whose ascent took 190 s showed 0.3 s)."""
    work: dict[str, float] = {}
    sharers: dict[str, list[str]] = {}
    for sid, keys in owners.items():
        for key in set(keys):
            sharers.setdefault(key, []).append(sid)
    for p in plan.passes:
        per_sample = max(1, p.cost.flops) * p.recipe.steps
        for key in p.keys:
            for sid in sharers.get(key, []):
                work[sid] = work.get(sid, 0.0) + per_sample / len(sharers[key])
    total = sum(work.values())
    return {sid: seconds * w / total for sid, w in work.items()} if total else {}


def _run_locked(
    spec: Spec,
    spec_path: Path,
    staging: Path,
    progress: Progress,
    engine: Any,
    batch_size: int | None,
    summary: RunSummary,
    inputs: str | None = None,
    datasets: DatasetRegistry | None = None,
) -> RunRecord:
    """Build the report in `staging`; returns what the run history will keep once it is published.
    `inputs`: the fingerprint of the run's inputs (`reportgen.unchanged`), kept with a memo of the built
    sections for the next unchanged run; None keeps none."""
    started = now()
    ctx, titled = _prepare(spec, spec_path, staging, progress, batch_size, datasets=datasets)
    work = plan_work(ctx, engine.memory_share, batch_size, engine.planned_workers)
    plan = work.ascent
    check_samples_fit(spec, ctx.models, plan.budget)
    summary.plan, summary.to_compute, summary.passes = work.lines(), work.pending, work.rows()
    for line in summary.plan:
        progress.info(f"plan: {line}")
    with ctx.timed("engine: ascent"):
        ctx.ascent.execute(progress, engine, spec_path)
    with ctx.timed("engine: forward"):
        execute_dataset(work.dataset, ctx, engine, spec_path, batch_size)
    execute_images(work.images, ctx, engine, spec_path, batch_size)  # timed per kind inside
    ascent_counts = ctx.ascent.section_counts()
    ascent_seconds = ascent_shares(plan, ctx.ascent.owners, ctx.timings.get("engine: ascent", 0.0))
    sizes: dict[str, set[tuple[int, int]]] = {}  # model -> input sizes the run used

    sections, steps, history = [], [], []
    for i, (section, analysis, title, sid, counts) in enumerate(titled):
        progress.info(f"section {i + 1}/{len(titled)}: {title}")
        with ctx.timed(sid), _counting(ctx, counts):
            result = analysis.build(section, ctx, SectionOutput(staging, sid), i)
        a_computed, a_reused = ascent_counts.get(sid, (0, 0))
        history += item_rows(i, sid, section.type, analysis.history_items(result), staging)
        model_key = getattr(section, "model", None)
        if model_key is not None:
            used = result.sizes or (
                [ctx.models.get(model_key).input_size] if getattr(section, "dataset", None) else []
            )
            sizes.setdefault(model_key, set()).update(tuple(int(v) for v in size) for size in used)
        seconds = ctx.timings.get(sid, 0.0) + ascent_seconds.get(sid, 0.0)
        results = {"computed": counts["computed"] + a_computed, "reused": counts["reused"] + a_reused}
        summary.sections[title] = results
        notes = dataset_notes(ctx.datasets, section)
        sections.append(
            section_entry(section, sid, title, result, notes, seconds, ascent_seconds.get(sid, 0.0), results)
        )
        steps.append({"name": title, "seconds": seconds, **results})
    for name, seconds in ctx.timings.items():
        if name.startswith("engine"):
            row: dict[str, Any] = {"name": name, "seconds": seconds, "computed": None, "reused": None}
            if name == "engine: ascent":
                row.update(computed=ctx.ascent.computed, reused=ctx.ascent.reused)
            steps.append(row)
    summary.computed = ctx.ascent.computed + ctx.computed
    summary.reused = ctx.ascent.reused + ctx.reused
    here = device_description()
    remote = ctx.ascent.devices | ctx.work.devices
    summary.device = (
        here
        if engine.in_process or not remote
        else (
            f"{here} (planning and rendering); ascent, image work and dataset passes on {engine.describe()}: "
            + "; ".join(sorted(remote))
        )
    )
    if inputs is not None:
        results = sorted(p.relative_to(ctx.store.root).as_posix() for p in ctx.store.used if p.is_file())
        facts = [ModelFacts(m.key, m.description, m.input_size, m.fixed_input, m.channels, m.digest)
                 for m in ctx.models.loaded()]  # fmt: skip
        save_memo(spec, spec_path, Memo(
            inputs, copy.deepcopy(sections), facts, sizes, history, file_digests(staging), results,
            summary.computed, summary.reused, summary.plan, summary.device,
        ))  # fmt: skip
    named = [(sid, title, s.type) for s, _, title, sid, _ in titled]
    models = ctx.models.loaded()
    return _finish(spec, spec_path, staging, summary, started, steps, sections, ctx.timings, models, sizes,
                   history, named, ctx)  # fmt: skip


def _run_unchanged(
    spec: Spec, spec_path: Path, staging: Path, progress: Progress, summary: RunSummary, memo: Memo
) -> RunRecord:
    """Every input is as in the last full run (`reportgen.unchanged.reusable`): its sections' files are
    copied into `staging` and the report is rendered from its memo, without importing TensorFlow."""
    started = now()
    copy_files(memo, Path(spec.output), staging)
    progress.info("plan: nothing to compute: every input is as in the last run; its sections are reused")
    summary.plan = ["nothing to compute: models, datasets, spec and code are as in the last run, whose "
                    f"{memo.computed + memo.reused} results and section files are reused"]  # fmt: skip
    summary.reused, summary.device = memo.computed + memo.reused, memo.device
    sections, steps = [], []
    for entry in memo.sections:
        results = {"computed": 0, "reused": entry["results"]["computed"] + entry["results"]["reused"]}
        sections.append({**entry, "seconds": 0.0, "ascent_seconds": 0.0, "results": results})
        steps.append({"name": entry["title"], "seconds": 0.0, **results})
        summary.sections[entry["title"]] = results
    named = [(e["id"], e["title"], e["type"]) for e in sections]
    return _finish(spec, spec_path, staging, summary, started, steps, sections, {}, memo.models, memo.sizes,
                   memo.history, named, None)  # fmt: skip


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _finish(
    spec: Spec,
    spec_path: Path,
    staging: Path,
    summary: RunSummary,
    started: str,
    steps: list[dict[str, Any]],
    sections: list[dict[str, Any]],
    timings: dict[str, float],
    models: list[Any],
    sizes: dict[str, set[tuple[int, int]]],
    history: list[Any],
    named: list[tuple[str, str, str]],
    ctx: Any,
) -> RunRecord:
    """What every run does once its sections are built: the change report against the baseline, trends,
    HTML, PDF and manifest in `staging`; returns the run's history record. `models`: loaded models (or
    their `ModelFacts`); `named`: (id, title, type) per section; `ctx`: the run context (None when the
    sections were reused, `_run_unchanged`)."""
    meta = run_meta(spec, spec_path, summary, started, steps, sections, timings)
    for entry in sections:  # the items a later `baseline: PATH` or `reportgen diff` compares with
        entry["items"] = manifest_items(history, entry["id"])
    changes = run_changes(spec, ctx, meta["spec_path"], history, named, staging)
    context = report_context(spec, meta, sections, models, sizes, changes)
    if spec.baseline is not None:  # a spec compared run to run: its figures over the runs too
        context["trends"] = trend_charts(
            history_path(spec), meta["spec_path"], history, named, staging, meta["finished"],
            lambda stype, runs: analysis_for(stype).trend_figures(runs),
        )
    with _timed(timings, "render: html"):
        render_html(context, staging / "report.html")
    if "pdf" in spec.formats:
        with _timed(timings, "render: pdf"):
            summary.pages = render_pdf(staging / "report.html", staging / "report.pdf")
    if "html" not in spec.formats:
        (staging / "report.html").unlink()
    write_manifest(staging / "manifest.json", spec, meta, sections, timings, changes)
    add_trends(staging / "manifest.json", context.get("trends", []))
    digests = {m.key: m.digest for m in models}
    output = str(Path(spec.output).resolve())
    return RunRecord(started, now(), meta["spec_path"], meta["spec_sha256"], output, digests, history)
