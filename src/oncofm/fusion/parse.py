"""Parse the one prediction line that every explanation ends with.

``Prediction: death within 5 years (risk 0.73)`` or ``Prediction: alive at 5 years (risk 0.21)``.
The parser is tolerant of case, extra spaces, a trailing full stop, Markdown emphasis and a percentage;
it takes the **last** prediction line in the text. Anything else is *unparsed* (``None``) and counted
by the evaluation, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ParsedPrediction", "format_prediction", "parse_prediction", "PREDICTION_RE"]

PREDICTION_RE = re.compile(
    r"prediction\s*[:：]\s*\**\s*(?P<outcome>death\s+within\s+5\s+years|alive\s+at\s+5\s+years)\s*\**\s*"
    r"\(\s*risk\s*[:=]?\s*(?P<risk>\d+(?:\.\d+)?)\s*(?P<pct>%)?\s*\)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParsedPrediction:
    death: bool  # the outcome words: True = "death within 5 years"
    risk: float  # in [0, 1]
    line: str


def format_prediction(death: bool, risk: float) -> str:
    """The canonical prediction line."""
    words = "death within 5 years" if death else "alive at 5 years"
    return f"Prediction: {words} (risk {risk:.2f})"


def parse_prediction(text: str) -> ParsedPrediction | None:
    """The last well-formed prediction line in ``text``, or ``None`` when there is none.

    Examples
    --------
    >>> parse_prediction("...\\nPrediction: alive at 5 years (risk 0.21)").risk
    0.21
    >>> parse_prediction("Prediction: maybe (risk high)") is None
    True
    """
    if not text:
        return None
    matches = list(PREDICTION_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    risk = float(m.group("risk"))
    if m.group("pct"):
        risk /= 100.0
    if not 0.0 <= risk <= 1.0:
        return None
    death = m.group("outcome").lower().startswith("death")
    return ParsedPrediction(death=death, risk=risk, line=m.group(0))
