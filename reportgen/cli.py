"""Command line: run · validate · layers · schema.

Exit codes (for cron): 0 success; 1 the run failed (one-line reason on stderr: the environment, e.g.
a full disk or a folder without write permission); 2 the spec (or a file it names) or the command line
is wrong; 3 another run of the same output is in progress; 4 the report was published but a
`--fail-on-change` rule fired; 130 interrupted (Ctrl-C, SIGINT); 143
terminated (SIGTERM, e.g. `kill` or a cron/systemd timeout). Every failure is one line on stderr; `-v`
adds the traceback of an unexpected one.

`run --jobs N` runs independent passes on N local processes; `run --backend dask --scheduler ADDRESS`
on a Dask cluster whose workers see the spec, the model files and the result store at the same paths
(the address may also come from DASK_SCHEDULER_ADDRESS).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from reportgen import TF_LOG_LEVEL_FROM_USER, __version__
from reportgen.errors import ReportgenError, SpecError, suggest

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
MESSAGE_CAP = 300  # characters of an exception's message in the one-line error


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler. A KeyboardInterrupt, so that everything that cleans up after
    Ctrl-C (the run's staging folder, the output lock, joblib workers) does the same for `kill`."""


@contextmanager
def _sigterm_raises() -> Iterator[threading.Event]:
    """SIGTERM raises `Terminated` meanwhile (its default kills the process without any cleanup).

    Yields an event that is set once SIGTERM arrived. Python runs the handler at the next bytecode, which
    may be a Python callback inside TensorFlow's C++ (while it traces a function); TensorFlow then turns
    the exception into another one (a SystemError, a ValueError). It still unwinds through every cleanup,
    and the event lets `main` report it as the termination it is."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield received
        return

    def raise_terminated(signum: int, frame: FrameType | None) -> None:
        received.set()
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _quiet_libraries(verbose: bool) -> None:
    """TensorFlow's C++ log and absl's Python log only with -v (see `reportgen/__init__.py`); must run
    before TensorFlow is imported. Worker processes inherit the variable."""
    if verbose and not TF_LOG_LEVEL_FROM_USER:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    logging.getLogger("absl").setLevel(logging.DEBUG if verbose else logging.ERROR)


def _one_line(text: str, cap: int = MESSAGE_CAP) -> str:
    """An exception's message as one line of at most `cap` characters (a message may quote a 10 MB
    value or span lines)."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= cap else line[: cap - 1] + "…"


def _environment_error(exc: BaseException, verbose: bool) -> str:
    """The one line for an unexpected exception: what the user can do about a full disk, a missing
    permission or too little memory; otherwise the exception's type and message."""
    if isinstance(exc, MemoryError):
        detail = f" ({_one_line(exc)})" if str(exc) else ""
        return (
            f"reportgen: out of memory{detail}; free memory, or lower --batch-size or the spec's sizes "
            "and image counts"
        )
    if isinstance(exc, OSError):
        where = f" {_one_line(exc.filename)}" if exc.filename is not None else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = where or " the report or the result store"
            return f"reportgen: disk full writing{where}; free disk space"
        if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
            return (
                f"reportgen: {exc.strerror or 'permission denied'}:{where or ' (path unknown)'}; give this "
                "user access to it, or choose another output:/cache: folder"
            )
    hint = "" if verbose else "; run with -v for the traceback"
    return f"reportgen: {type(exc).__name__}: {_one_line(exc)}{hint}"


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    fmt = "%(asctime)s %(levelname)s %(message)s" if not sys.stderr.isatty() else "%(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%dT%H:%M:%S"))
    logger = logging.getLogger("reportgen")  # only ours: fontTools/WeasyPrint chatter stays out of cron logs
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def cmd_run(args: argparse.Namespace) -> int:
    from reportgen.gate import check_rules, evaluate
    from reportgen.runner import run
    from reportgen.spec.load import load_spec

    rules = check_rules(args.fail_on_change, load_spec(args.spec)) if args.fail_on_change else []
    summary = run(
        args.spec,
        quiet=args.quiet,
        dry_run=args.dry_run,
        jobs=args.jobs,
        backend=args.backend,
        scheduler=args.scheduler,
        batch_size=args.batch_size,
    )
    if args.dry_run and args.json:
        print(json.dumps({"passes": summary.passes}, indent=1))
        return 0
    if args.dry_run:
        done = "plan: nothing to compute, every planned result is in the store"
        print("plan:" if summary.to_compute else done)
        for line in summary.plan:
            print(f"  {line}")
        return 0
    if not args.quiet:
        print(
            f"report: {summary.output / 'report.html'}"
            + (f" and report.pdf ({summary.pages} pages)" if summary.pages else "")
            + f"; {summary.computed} results computed, {summary.reused} reused, {summary.seconds:.1f} s"
        )
    if rules:  # after publishing: the report of a failing night is what people open
        manifest = json.loads((summary.output / "manifest.json").read_text(encoding="utf-8"))
        return gate_exit(evaluate(rules, manifest.get("changes")))
    return 0


def gate_exit(fired: list[str]) -> int:
    """The exit code of a published report whose `--fail-on-change` rules fired (one stderr line), or 0."""
    from reportgen.gate import EXIT_CHANGED

    if not fired:
        return 0
    more = f" (and {len(fired) - 1} more rules)" if len(fired) > 1 else ""
    print(f"reportgen: {fired[0]}{more}", file=sys.stderr)
    return EXIT_CHANGED


def cmd_validate(args: argparse.Namespace) -> int:
    from reportgen.spec.load import load_spec

    spec = load_spec(args.spec)
    if args.models:
        from reportgen.analyses.base import RunContext  # noqa: F401 - imports TF only when asked
        from reportgen.models import ModelRegistry

        registry = ModelRegistry(spec)
        from reportgen.datasets import DatasetRegistry
        from reportgen.spec.files import check_files
        from reportgen.spec.load import locate

        check_files(spec, registry, DatasetRegistry(spec))

        for i, section in enumerate(spec.sections):
            model = getattr(section, "model", None)
            if model is None:
                continue
            lm = registry.get(model)
            for field in ("layers", "layer"):
                value = getattr(section, field, None)
                names = value if isinstance(value, list) else [value] if value else []
                for j, name in enumerate(names):
                    path = ("sections", i, field, j) if isinstance(value, list) else ("sections", i, field)
                    lm.layer(name, locate(spec, path))
        from reportgen.plan import check_samples_fit, device_budget

        check_samples_fit(spec, registry, device_budget())
    print(f"{args.spec}: ok ({len(spec.sections)} sections, {len(spec.models)} models)")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from reportgen.models import load_model, model_spec_from_reference

    if args.model_key:
        from reportgen.spec.load import load_spec

        spec = load_spec(args.model)
        if args.model_key not in spec.models:
            hint = suggest(args.model_key, list(spec.models))
            raise ReportgenError(f"{args.model}: no model {args.model_key!r}; {hint}")
        lm = load_model(args.model_key, spec.models[args.model_key])
    else:
        lm = load_model(args.model, model_spec_from_reference(args.model))
    rows = lm.layer_table()
    if args.json:
        print(json.dumps(rows, indent=1, default=list))
        return 0
    print(f"{lm.key}: {lm.description}; input {lm.model.input_shape}")
    width = max(len(r["name"]) for r in rows)
    print(f"{'layer':<{width}}  {'type':<22} {'output shape':<24} {'channels':>8}")
    for r in rows:
        shape = "(" + ", ".join("?" if d is None else str(d) for d in r["output_shape"]) + ")"
        channels = r["channels"] if r["channels"] else ""
        print(f"{r['name']:<{width}}  {r['type']:<22} {shape:<24} {channels:>8}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from reportgen.diff import diff

    summary = diff(
        Path(args.old),
        Path(args.new),
        Path(args.output),
        pdf=not args.no_pdf,
        thresholds=args.threshold,
        rules=args.fail_on_change,
    )
    if not args.quiet:
        counts = ", ".join(f"{v} {k}" for k, v in summary.counts.items())
        plural = "s" if summary.pages != 1 else ""
        pages = f" and report.pdf ({summary.pages} page{plural})" if summary.pages else ""
        print(f"change report: {summary.output / 'report.html'}{pages}; {counts}")
    return gate_exit(summary.fired)


def cmd_schema(args: argparse.Namespace) -> int:
    from reportgen.spec.schema import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
        try:
            Path(args.output).write_text(text + "\n")
        except OSError as exc:  # a failed write (e.g. a full disk) does not name the file by itself
            raise OSError(exc.errno, exc.strerror, exc.filename or args.output) from exc
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reportgen", description="Reports of what convolutional networks learn."
    )
    parser.add_argument("--version", action="version", version=f"reportgen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="compute (or reuse) every result of a spec and render its report")
    p.add_argument("spec")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (passes, batch sizes, estimated FLOPs) and what the store holds",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="with --dry-run: print the plan as JSON, one row per pass of every kind",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="local worker processes for independent passes (default 1: this process)",
    )
    p.add_argument(
        "--backend",
        choices=("loky", "dask"),
        default="loky",
        help="loky: local processes; dask: the Dask cluster at --scheduler",
    )
    p.add_argument(
        "--scheduler",
        default=os.environ.get("DASK_SCHEDULER_ADDRESS"),
        help="Dask scheduler address, e.g. tcp://10.0.0.5:8786 (default: $DASK_SCHEDULER_ADDRESS)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per chunk (default: what fits the device's free memory)",
    )
    p.add_argument(
        "--fail-on-change",
        action="append",
        default=[],
        metavar="RULE",
        help="exit 4 after publishing when the change report crosses RULE (repeatable): SECTION.FIGURE OP "
        "NUMBER, e.g. predictions.flips>0.05, filters.changed>=3, class_ranking.tau<0.8; SECTION is a "
        "section type or title; FIGURE a count (changed, unchanged, new, removed), its share "
        "(changed_share, ...), or any figure of the section's change report (item metrics are averaged); "
        "OP one of > >= < <= == !=; NUMBER may end in %%. Needs `baseline:` in the spec",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a spec; with --models also load models and check layer names")
    p.add_argument("spec")
    p.add_argument("--models", action="store_true", help="load the models and check every layer name")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("layers", help="list a model's layers: name, type, output shape, channels")
    p.add_argument(
        "model", help="builtin name (vgg16-hed), keras.applications name, .keras/.h5 file, or a spec"
    )
    p.add_argument("model_key", nargs="?", help="with a spec: the key of the model under `models:`")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("diff", help="the 'What changed' report of two output folders, nothing recomputed")
    p.add_argument("old", help="the earlier output folder")
    p.add_argument("new", help="the later output folder")
    p.add_argument("-o", "--output", required=True, help="folder to publish the change report to")
    p.add_argument("--no-pdf", action="store_true", help="HTML only")
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="TYPE.FIELD=NUMBER",
        help="override a change threshold (repeatable), e.g. filters.ssim=0.8; the defaults are NEW's "
        "recorded `changes:` (or the documented defaults)",
    )
    p.add_argument(
        "--fail-on-change",
        action="append",
        default=[],
        metavar="RULE",
        help="exit 4 after publishing when the change report crosses RULE (repeatable; the grammar of "
        "`run --fail-on-change`, e.g. predictions.flips>0.05)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("schema", help="print the spec's JSON Schema (for editors)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.backend == "dask" and not args.scheduler:
            parser.error("--backend dask needs --scheduler ADDRESS (or DASK_SCHEDULER_ADDRESS)")
        if args.jobs < 1:
            parser.error(f"--jobs must be at least 1 (got {args.jobs})")
        if args.json and not args.dry_run:
            parser.error("--json needs --dry-run (it prints the plan)")
        if args.batch_size is not None and args.batch_size < 1:
            parser.error(f"--batch-size must be at least 1 (got {args.batch_size})")
    _quiet_libraries(args.verbose)
    _setup_logging(getattr(args, "quiet", False), args.verbose)
    received_sigterm = threading.Event()
    try:
        with _sigterm_raises() as received_sigterm:
            return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        return _report(exc, args.verbose, received_sigterm.is_set())


def _report(exc: BaseException, verbose: bool, terminated: bool) -> int:
    """Print the one line (or the spec's problems) for a failed command; return its exit code."""
    from reportgen.publish import LockedError
    from reportgen.runner import EXIT_FAILED, EXIT_LOCKED, EXIT_SPEC

    if terminated or isinstance(exc, Terminated):
        print("reportgen: terminated; results computed so far are kept in the store", file=sys.stderr)
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        print("reportgen: interrupted; results computed so far are kept in the store", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, SpecError):
        print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_SPEC
    if isinstance(exc, ReportgenError):
        print(f"reportgen: {exc}", file=sys.stderr)
        return EXIT_LOCKED if isinstance(exc, LockedError) else EXIT_FAILED
    if verbose:  # MemoryError and OSError included: one line for a cron log, the traceback with -v
        traceback.print_exception(exc)
    print(_environment_error(exc, verbose), file=sys.stderr)
    return EXIT_FAILED
