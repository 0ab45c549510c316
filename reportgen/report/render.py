"""Render the report: one Jinja2 base layout plus one partial per section type; WeasyPrint for the PDF."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import (
    BytecodeCache,
    Environment,
    FileSystemBytecodeCache,
    FileSystemLoader,
    StrictUndefined,
    select_autoescape,
)
from jinja2.bccache import Bucket

from reportgen.errors import ReportgenError
from reportgen.report.pdf_images import passthrough_png


def template_dir() -> Path:
    """The repository's top-level templates/, installed as the package `reportgen.templates`: found
    through the import system, it is the same call for a wheel and for an editable install."""
    folder = Path(str(files("reportgen.templates")))
    if not (folder / "base.html.j2").is_file():
        raise ReportgenError(
            f"report templates not found in {folder}: a broken installation; reinstall reportgen "
            "(pip install . or pip install -e .)"
        )
    return folder


class _BestEffortBytecodeCache(FileSystemBytecodeCache):
    """A cache folder that cannot be read or written (a full or read-only temp directory) only costs the
    compile it would have saved, never the report."""

    def load_bytecode(self, bucket: Bucket) -> None:
        try:
            super().load_bytecode(bucket)
        except OSError:
            bucket.reset()

    def dump_bytecode(self, bucket: Bucket) -> None:
        try:
            super().dump_bytecode(bucket)
        except OSError:
            pass


def bytecode_cache() -> BytecodeCache | None:
    """Compiled templates kept between runs: compiling the report's templates is ~0.15 s of an unchanged
    night's 2 s. Jinja's own per-user folder under the temp directory (it refuses one that another user
    owns or can write), keyed by each template's source checksum, written atomically; None where there is
    no such folder (the templates are then compiled every run, as before)."""
    try:
        return _BestEffortBytecodeCache()
    except (OSError, RuntimeError):
        return None


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(template_dir())),
        bytecode_cache=bytecode_cache(),
        autoescape=select_autoescape(["html", "j2"], default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = lambda v, spec=".3g": format(v, spec) if isinstance(v, int | float) else v
    return env


def render_html(context: dict[str, Any], target: Path) -> None:
    """report.html: images referenced by relative path, so the folder can be moved or served as is."""
    html = environment().get_template("base.html.j2").render(**context)
    target.write_text(html, encoding="utf-8")
    (target.parent / "report.css").write_bytes((template_dir() / "report.css").read_bytes())


def render_pdf(html_path: Path, target: Path) -> int:
    """PDF from the HTML file. Only file: and data: URLs are fetched, and a failed fetch is an error:
    otherwise WeasyPrint silently shows alt text for a missing image, or fetches remote URLs."""
    from weasyprint import HTML
    from weasyprint.urls import URLFetcher

    fetcher = URLFetcher(allowed_protocols=("file", "data"), fail_on_errors=True)
    doc = HTML(filename=str(html_path), base_url=str(html_path.parent), url_fetcher=fetcher).render()
    relative_file_links(doc, html_path.parent)
    with passthrough_png():
        doc.write_pdf(target)
    return len(doc.pages)


def relative_file_links(doc: Any, folder: Path) -> None:
    """Turn the PDF's links to files of the report folder back into relative links, in place.

    WeasyPrint resolves every href against base_url, so `assets/x.csv` would become
    `file:///…/.out.staging-PID/assets/x.csv`: a folder that publishing deletes, and a local path that
    should not travel with the PDF. Relative, the link works wherever the published folder is moved (PDF
    viewers resolve it against the PDF's own location). A file link outside the folder has no meaning
    for a reader elsewhere, so it is dropped (the HTML never makes one; author links are http(s) only).
    """
    from urllib.parse import quote, unquote, urlsplit

    root = folder.resolve()
    for page in doc.pages:
        kept = []
        for link_type, target, rectangle, box in page.links:
            if link_type == "external" and target.startswith("file:"):
                parts = urlsplit(target)
                try:
                    rel = Path(unquote(parts.path)).resolve().relative_to(root)
                except ValueError:
                    continue
                target = quote(rel.as_posix()) + (f"#{parts.fragment}" if parts.fragment else "")
            kept.append((link_type, target, rectangle, box))
        page.links[:] = kept
