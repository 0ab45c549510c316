"""Page-flow estimate for the report (A4, the numbers of templates/report.css): where a block that never
breaks would leave most of a page empty, a section can shrink its grids to fit instead."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

from reportgen.imaging import text_lines
from reportgen.report.render import environment

# WeasyPrint lays the report out only at the end, and a layer block (heading, caption, grids) never breaks.
# A block that does not fit the rest of a page moves on and leaves that page part empty: the section's
# findings alone on its first page, or one layer per page where two nearly fit. So the flow is estimated
# here and a grid may shrink, to no less than MIN_GRID_SCALE of its size, to fit the space left. The
# numbers mirror templates/report.css (A4 with 18/16/20/16 mm margins; font sizes and margins in pt;
# line-height 1.4).
PT_PER_MM = 72 / 25.4
PAGE_HEIGHT = (297 - 18 - 20) * PT_PER_MM
PAGE_WIDTH = (210 - 16 - 16) * PT_PER_MM
GRID_MAX_HEIGHT = 215 * PT_PER_MM  # img.grid { max-height }
SIDE_BY_SIDE_WIDTH = PAGE_WIDTH / 2 - 6  # a table.side-by-side cell: half the width, 3 pt padding a side
MIN_GRID_SCALE = 0.5  # a grid that would shrink more starts the next page at full size instead
SLACK = 6 * PT_PER_MM  # what the estimate may be off by (a line or two of text)
BOX_INSET = 3 + 2 * 8  # .findings / .observations: 3 pt border, 8 pt padding a side
LIST_INDENT = 30  # a list's 40 px indent
Block = tuple[float, float, float]  # (margin-top, height, margin-bottom) in pt


def _stack(blocks: list[Block]) -> Block:
    """Blocks one under the other, adjoining vertical margins collapsed to the larger one (CSS)."""
    height, gap = 0.0, None
    for top, h, bottom in blocks:
        height += (max(gap, top) if gap is not None else 0.0) + h
        gap = bottom
    return (blocks[0][0], height, gap) if blocks else (0.0, 0.0, 0.0)


def _box(inner: list[Block]) -> Block:
    """A .findings / .observations box: 4 pt padding (which stops margin collapsing) and 6 pt margins."""
    top, height, bottom = _stack([(8, 14, 4), *inner])  # the h4, then the content
    return (6, 4 + top + height + bottom + 4, 6)


def _text(text: str, size: float, width: float, top: float, bottom: float, bold: bool = False) -> Block:
    return (top, 1.4 * size * text_lines(text, size, width, bold), bottom)


def plain_params(params: dict[str, Any], size: tuple[int, int]) -> str:
    """The recipe's parameter line as the report prints it (the template's macro), without markup."""
    line = environment().get_template("macros.html.j2").module.recipe_params(params, size)
    return html.unescape(re.sub(r"<[^>]+>", " ", str(line)))


def _list(items: list[str]) -> Block:
    """A ul: 2 pt margins around lines of 10 pt text, indented by LIST_INDENT inside a box."""
    width = PAGE_WIDTH - BOX_INSET - LIST_INDENT
    return (2, sum(_text(t, 10, width, 0, 0)[1] for t in items), 2)


def lead_height(
    title: str, findings: list[str], observations_html: str, recipe_texts: list[str], overrides: bool
) -> float:
    """Estimated height (pt) of what precedes the first layer: title, findings, observations, recipes;
    without the last margin, which collapses into the layer heading's."""
    blocks = [_text(title, 18, PAGE_WIDTH, 0, 6, bold=True), (0, 1.4 * 8.5, 8.5)]  # h1, .section-meta
    if findings:
        blocks.append(_box([_list(findings)]))
    if observations_html:
        inner: list[Block] = []
        items: list[str] = []  # a run of list items, one ul
        for tag, content in re.findall(r"<(p|li|h\d)\b[^>]*>(.*?)</\1>", observations_html, re.S):
            text = html.unescape(re.sub(r"<[^>]+>", " ", content))
            if tag == "li":
                items.append(text)
                continue
            if items:
                inner, items = [*inner, _list(items)], []
            inner.append(_text(text, 10, PAGE_WIDTH - BOX_INSET, 10, 10))
        blocks.append(_box(inner + ([_list(items)] if items else [])))
    blocks += [_text(t, 9, PAGE_WIDTH, 9, 9) for t in recipe_texts + (["Overrides"] if overrides else [])]
    return _stack(blocks)[1]


def plan_grid_heights(lead: float, layers: list[dict[str, Any]], side_by_side: bool) -> list[float | None]:
    """Per layer, a max-height (pt) for its grids when they must shrink to share a page, else None.

    Simulates the page flow: a block that fits the space left stays there; one that would fit at
    MIN_GRID_SCALE of its grid's size or more is shrunk to fit; any other starts a new page at full size.
    """
    width = SIDE_BY_SIDE_WIDTH if side_by_side else PAGE_WIDTH
    # h2 (its 12 pt top margin dropped at the top of a page), the caption (`caption`: its text, else two
    # lines), the grids' margins and, side by side, the table's margins and the recipe title over each grid
    extra = 8.5 + 1.4 * 9 + 4 if side_by_side else 8.5
    base_tail = 4 + (4 if side_by_side else 0)
    y, caps = lead % PAGE_HEIGHT, []  # a lead longer than a page ends on a later one
    for layer in layers:
        caption = text_lines(layer["caption"], 8.5, PAGE_WIDTH) if layer.get("caption") else 2
        # a caption paragraph under the grids (the quality line): its lines and its 8.5 pt margin
        tail = base_tail + (
            text_lines(layer["quality"], 8.5, PAGE_WIDTH) * 1.4 * 8.5 + 8.5 if layer.get("quality") else 0
        )
        head = 1.4 * 13 + 8.5 + caption * 1.4 * 8.5 + extra
        natural = max(
            min(h * 0.75, width * h / w, GRID_MAX_HEIGHT)  # a CSS px is 0.75 pt
            for w, h in (g["px"] for g in layer["grids"])
        )
        room = PAGE_HEIGHT - (y + 12 if y else 0) - head - tail
        if natural <= room:
            caps.append(None)
            y += (12 if y else 0) + head + natural + tail
        elif y and room - SLACK >= MIN_GRID_SCALE * natural:
            caps.append(room - SLACK)
            y += 12 + head + room - SLACK + tail
        else:
            caps.append(None)
            y = head + natural + tail
    return caps


# The unit atlas (`exemplars` with `atlas: true`): one row per unit, a fixed number of rows per page, so
# a layer of hundreds of units reads as pages of equal rows. The numbers mirror .atlas in report.css.
ATLAS_THUMB_MAX = 64.0  # pt (22.6 mm): a thumbnail's side however few share a row
ATLAS_LABEL = 76.0  # pt: the unit column (index, top classes, quality figures)
ATLAS_GAP = 2.0  # pt between thumbnails
ATLAS_FONT = 6.0  # pt: values under thumbnails and the unit column's text, line-height 1.25
ATLAS_ROW_PAD = 2 * 2 + 0.5  # a row's padding (2 pt top and bottom) and its 0.5 pt rule


@dataclass(frozen=True)
class AtlasLayout:
    """Sizes of a unit atlas, in pt: a thumbnail's side, one row's height, and how many rows fit on the
    section's first page (under its lead and caption) and on each later page."""

    thumb: float
    row: float
    first: int
    per_page: int

    def pages(self, rows: list[Any]) -> list[dict[str, Any]]:
        """`rows` cut into page groups: {"rows", "break": whether the group starts a new page}. A lead
        that leaves no room for a row sends the first group to the next page."""
        groups = [rows[: self.first]] if self.first else []
        rest = rows[self.first :]
        groups += [rest[i : i + self.per_page] for i in range(0, len(rest), self.per_page)]
        return [{"rows": g, "break": bool(i or not self.first)} for i, g in enumerate(g for g in groups if g)]


def atlas_layout(lead: float, caption: str, thumbs: int, label_lines: int) -> AtlasLayout:
    """The atlas's sizes for rows of `thumbs` thumbnails (visualisations and exemplar crops) beside a unit
    column of `label_lines` lines: thumbnails share the width left by the unit column (at most
    ATLAS_THUMB_MAX, so that few per row stay thumbnails), and a row is as tall as its thumbnail with its
    value line, or its unit column if that is taller. `lead`: height of what precedes the section's
    partial (`lead_height`); `caption`: the partial's caption paragraph above the rows."""
    thumbs = max(thumbs, 1)
    thumb = min(ATLAS_THUMB_MAX, (PAGE_WIDTH - ATLAS_LABEL - ATLAS_GAP * thumbs) / thumbs)
    line = 1.25 * ATLAS_FONT
    row = max(thumb + line + 1, label_lines * line) + ATLAS_ROW_PAD
    top = lead % PAGE_HEIGHT + text_lines(caption, 8.5, PAGE_WIDTH) * 1.4 * 8.5 + 8.5
    per_page = max(1, int((PAGE_HEIGHT - SLACK) // row))
    first = max(0, int((PAGE_HEIGHT - top - SLACK) // row))
    return AtlasLayout(thumb, row, first, per_page)
