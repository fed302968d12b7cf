"""Slide-level image features in a pathologist's words.

The hif2gene vocabulary (Diao et al., Nat Commun 2021) names features like
``DENSITY RATIO [LYMPHOCYTE CELLS] IN [[STROMA] OVER [TUMOR]]``; :func:`describe_feature` turns such a name
into "lymphocyte density in stroma relative to tumor". Names outside that grammar (a slide encoder's
``uni_17``) are returned as they are, lower-cased only when they are all capitals. The grammar:

- ``DENSITY [A] IN [R]`` → "A density in R"
- ``DENSITY RATIO [A] IN [[R1] OVER [R2]]`` → "A density in R1 relative to R2"
- ``DENSITY RATIO [[A] OVER [B]] IN [R]`` → "ratio of A to B density in R"
- ``COUNT PROP [[A] OVER [B]] IN [R]`` → "A as a share of B in R"
- ``COUNT PROP [A] IN [[R1] OVER [R2]]`` → "share of A in R1 relative to R2"
- ``TOTAL [A] IN [R] (SELECTED BY [X_RADIUS_80])`` → "number of A in R (within 80 µm of X cells)"
- ``AREA (MM2) OF [X] IN [TISSUE]`` → "area of X (mm²)";  ``AREA PROP [[X] OVER [Y]] IN [TISSUE]`` → "area of X
  relative to Y"
- ``CELL CLUSTERING PROPERTIES: <M> OF <CELL> IN <R>`` → "<m> of <cell> clusters in R"
- ``REGION PROPERTIES: <M> OF <R>`` → "<m> of R"

No description holds ``:``, ``;`` or ``,`` (the explanation lists features separated by ``;`` after a ``:``).
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["describe_feature"]

_ATOMS = {"ESI_0080": "the epithelium-stroma interface", "EPITHELIAL": "epithelium", "TUMOR": "tumor",
          "STROMA": "stroma", "NECROSIS": "necrosis", "TISSUE": "tissue"}
_RADIUS = re.compile(r"^([A-Z]+)_RADIUS_(\d+)$")
#: cell type → (plural, adjective)
_CELLS = {"CANCER": ("cancer cells", "cancer cell"), "LYMPHOCYTE": ("lymphocytes", "lymphocyte"),
          "MACROPHAGE": ("macrophages", "macrophage"), "PLASMA": ("plasma cells", "plasma cell"),
          "FIBROBLAST": ("fibroblasts", "fibroblast")}
_CELL = re.compile(r"^([A-Z]+) CELLS$")


def _split_top(text: str, word: str) -> tuple[str, str] | None:
    """Split ``text`` at the first ``word`` outside brackets."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if depth == 0 and text.startswith(word, i):
            return text[:i].strip(), text[i + len(word):].strip()
    return None


def _unwrap(text: str) -> str:
    """``[X]`` → ``X`` when the outer brackets enclose the whole text."""
    text = text.strip()
    while text.startswith("[") and text.endswith("]"):
        depth = 0
        for i, ch in enumerate(text):
            depth += ch == "["
            depth -= ch == "]"
            if depth == 0 and i < len(text) - 1:
                return text
        text = text[1:-1].strip()
    return text


def _term(text: str) -> str:
    """A bracketed term in words: a cell type, a region, ``A SELECTED BY B``, ``A OVER B`` (as "A to B")."""
    text = _unwrap(text)
    sel = _split_top(text, " SELECTED BY ")
    if sel:
        return f"{_term(sel[0])} {_term(sel[1])}"
    over = _split_top(text, " OVER ")
    if over:
        return f"{_term(over[0])} relative to {_term(over[1])}"
    if m := _RADIUS.match(text):
        return f"within {int(m.group(2))} µm of {_plural(m.group(1))}"
    if m := _CELL.match(text):
        return _plural(m.group(1))
    return _ATOMS.get(text, text.lower().replace("_", " "))


def _plural(cell: str) -> str:
    return _CELLS.get(cell, (f"{cell.lower()} cells", ""))[0]


def _adjective(cell: str) -> str:
    return _CELLS.get(cell, ("", f"{cell.lower()} cell"))[1]


def _cell(text: str) -> str:
    """``[LYMPHOCYTE CELLS]`` → ``lymphocyte`` (the adjective form before "density")."""
    m = _CELL.match(_unwrap(text))
    return _adjective(m.group(1)) if m else _term(text)


def _over(text: str) -> tuple[str, str] | None:
    parts = _split_top(_unwrap(text), " OVER ")
    return (parts[0], parts[1]) if parts else None


def _properties(text: str) -> str | None:
    """The cell-clustering and region-property families in words (None: neither)."""
    if m := re.match(r"^CELL CLUSTERING PROPERTIES: (.+) OF ([A-Z]+) IN ([A-Z_0-9]+)$", text):
        metric, cell, where = m.group(1).lower(), _adjective(m.group(2)), _term(m.group(3))
        if "cluster" in metric:  # "cluster size mean" -> "lymphocyte cluster size mean"
            return f"{re.sub(r'clusters?', lambda c: f'{cell} {c.group(0)}', metric, count=1)} in {where}"
        return f"{metric} of {cell} clusters in {where}"
    if m := re.match(r"^REGION PROPERTIES: (.+) OF ([A-Z_0-9]+)$", text):
        return f"{m.group(1).lower().replace('(mm2)', '(mm²)')} of {_term(m.group(2))}"
    return None


@lru_cache(maxsize=4096)
def describe_feature(name: str) -> str:
    """The feature ``name`` in words (see the module docstring); unknown grammar → the name itself."""
    raw = str(name).strip()
    text = re.sub(r"_(HE|FFPE)$", "", raw.upper())
    try:
        if text.startswith("DENSITY RATIO "):
            body = text.removeprefix("DENSITY RATIO ")
            what, where = _split_top(body, " IN ") or (body, "")
            if pair := _over(what):
                return f"ratio of {_cell(pair[0])} to {_cell(pair[1])} density in {_term(where)}"
            if pair := _over(where):
                return f"{_cell(what)} density in {_term(pair[0])} relative to {_term(pair[1])}"
        if text.startswith("DENSITY "):
            what, where = _split_top(text.removeprefix("DENSITY "), " IN ") or ("", "")
            return f"{_cell(what)} density in {_term(where)}"
        if text.startswith("COUNT PROP "):
            what, where = _split_top(text.removeprefix("COUNT PROP "), " IN ") or ("", "")
            if pair := _over(what):
                return f"{_term(pair[0])} as a share of {_term(pair[1])} in {_term(where)}"
            if pair := _over(where):
                return f"share of {_term(what)} in {_term(pair[0])} relative to {_term(pair[1])}"
        if text.startswith("TOTAL "):
            body = text.removeprefix("TOTAL ")
            sel = _split_top(body, " SELECTED BY ")
            what, where = _split_top(sel[0] if sel else body, " IN ") or ("", "")
            tail = f" {_term(sel[1])}" if sel else ""
            return f"number of {_term(what)} in {_term(where)}{tail}"
        if text.startswith("AREA (MM2) OF "):
            what, _ = _split_top(text.removeprefix("AREA (MM2) OF "), " IN ") or ("", "")
            return f"area of {_term(what)} (mm²)"
        if text.startswith("AREA PROP "):
            what, _ = _split_top(text.removeprefix("AREA PROP "), " IN ") or ("", "")
            if pair := _over(what):
                return f"area of {_term(pair[0])} relative to {_term(pair[1])}"
        if (words := _properties(text)) is not None:
            return words
    except (TypeError, ValueError):  # pragma: no cover - a malformed name falls back to itself
        pass
    return raw.lower() if raw.isupper() else raw
