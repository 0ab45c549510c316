"""Author text to safe HTML: spec text must never inject markup, scripts or local-file fetches."""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt

_md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table").disable("image")

_TAGS = {
    "p",
    "em",
    "strong",
    "code",
    "pre",
    "ul",
    "ol",
    "li",
    "blockquote",
    "a",
    "h3",
    "h4",
    "h5",
    "h6",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "br",
    "hr",
}


def render_markdown(text: str | None) -> str:
    """CommonMark with raw HTML escaped and images disabled; headings demoted below section titles,
    then sanitised by nh3 (only http/https/mailto links) as a second line of defence."""
    if not text:
        return ""
    html = _md.render(text)
    for level in range(1, 3):
        html = html.replace(f"<h{level}>", "<h3>").replace(f"</h{level}>", "</h3>")
    return nh3.clean(html, tags=_TAGS, url_schemes={"http", "https", "mailto"}, link_rel="noopener")
