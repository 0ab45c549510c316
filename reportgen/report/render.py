"""Render the report: one Jinja2 base layout plus one partial per section type; WeasyPrint for the PDF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def template_dir() -> Path:
    if not (TEMPLATES / "base.html.j2").exists():
        raise FileNotFoundError(
            f"report templates not found in {TEMPLATES}; install reportgen with pip install -e ."
        )
    return TEMPLATES


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(template_dir())),
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
    doc.write_pdf(target)
    return len(doc.pages)
