"""Faithfulness of a generated explanation to the patient's evidence record.

Three kinds of claims are checked in the text (the prediction line excluded):

- **genes**: every gene symbol named (from the cohort's gene list) must be one of the record's risk or
  protective genes; ``hallucinated_gene_rate`` = named genes not in the record / genes named;
- **directions**: a named evidence gene in a clause that says *raise / adverse / push the risk up* must
  be a risk gene, in one that says *lower / protective / push the risk down* a protective gene;
- **numbers**: a number right after a gene (``z +1.8``, ``q 0.01``, ``Cox +``) must equal that gene's value
  at the precision written; any other number must equal some number of the record (percentages /100).

``faithfulness`` = agreeing claims / all claims (1.0 for a text with no checkable claim).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from oncofm.fusion.evidence import ALTERATION_RE, evidence_numbers
from oncofm.fusion.parse import PREDICTION_RE
from oncofm.fusion.templates import PROTECTIVE_WORDS, RISK_WORDS

__all__ = ["FaithfulnessScore", "score_faithfulness"]

_NUM = re.compile(r"(?<![\w.])([+-]?\d+(?:\.\d+)?(?:e-?\d+)?)(\s*%)?")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-\.]*[A-Za-z0-9]|[A-Za-z0-9]")


@dataclass
class FaithfulnessScore:
    genes_named: int = 0
    genes_ok: int = 0
    directions: int = 0
    directions_ok: int = 0
    numbers: int = 0
    numbers_ok: int = 0

    @property
    def claims(self) -> int:
        return self.genes_named + self.directions + self.numbers

    @property
    def faithfulness(self) -> float:
        return 1.0 if self.claims == 0 else (self.genes_ok + self.directions_ok + self.numbers_ok) / self.claims

    @property
    def hallucinated_gene_rate(self) -> float:
        return 0.0 if self.genes_named == 0 else (self.genes_named - self.genes_ok) / self.genes_named

    def __add__(self, other: FaithfulnessScore) -> FaithfulnessScore:
        a, b = asdict(self), asdict(other)
        return FaithfulnessScore(**{k: a[k] + b[k] for k in a})

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "faithfulness": self.faithfulness, "hallucinated_gene_rate": self.hallucinated_gene_rate}


def _decimals(token: str) -> int:
    return len(token.split(".")[1]) if "." in token and "e" not in token.lower() else 0


def _agrees(value: float, token: str, candidates: list[float]) -> bool:
    tol = 0.5 * 10 ** (-_decimals(token)) + 1e-9
    if "e" in token.lower():
        return any(abs(value - c) <= abs(c) * 0.05 + 1e-12 for c in candidates)
    return any(abs(value - c) <= tol for c in candidates)


def _direction(sentence: str) -> str | None:
    s = sentence.lower()
    risk = any(w in s for w in RISK_WORDS)
    prot = any(w in s for w in PROTECTIVE_WORDS)
    if risk == prot:
        return None
    return "risk" if risk else "protective"


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])|\n", text) if s.strip()]


def score_faithfulness(text: str, evidence: dict, gene_vocabulary: set[str]) -> FaithfulnessScore:
    """Check the genes, directions and numbers of ``text`` against ``evidence``."""
    body = PREDICTION_RE.sub(" ", text or "")
    genes = {g["gene"]: ("risk", g) for g in evidence.get("risk_genes") or []}
    genes.update({g["gene"]: ("protective", g) for g in evidence.get("protective_genes") or []})
    all_numbers = evidence_numbers(evidence)
    cited = {str(a["gene"]) for a in evidence.get("alterations") or []}
    score = FaithfulnessScore()
    for sentence in _sentences(body):
        for m in list(ALTERATION_RE.finditer(sentence))[::-1]:  # "TP53 mutated (Cox +, q 0.01)": the checker's
            score.genes_named += 1  # alteration rules judge the facts; here the gene counts as named
            score.genes_ok += int(m.group(1) in cited)
            sentence = sentence[: m.start()] + " " + sentence[m.end():]
        direction = _direction(sentence)
        # split the sentence at gene mentions: the numbers after a gene belong to it
        spans: list[tuple[str | None, int, int]] = []
        last_gene, last_pos = None, 0
        for m in _WORD.finditer(sentence):
            word = m.group(0)
            if word in gene_vocabulary or word in genes:
                spans.append((last_gene, last_pos, m.start()))
                last_gene, last_pos = word, m.end()
                score.genes_named += 1
                if word in genes:
                    score.genes_ok += 1
                    if direction is not None:
                        score.directions += 1
                        score.directions_ok += int(genes[word][0] == direction)
        spans.append((last_gene, last_pos, len(sentence)))
        for gene, a, b in spans:
            segment = sentence[a:b]
            own = genes.get(gene, (None, None))[1] if gene else None
            for m in _NUM.finditer(segment):
                token = m.group(1)
                after = segment[m.end(): m.end() + 8].lower()
                if re.match(r"\s*(-\s*)?years?", after) or re.match(r"\s*(-\s*)?year", after):
                    continue  # "5 years": the horizon, not evidence
                value = float(token) / (100.0 if m.group(2) else 1.0)
                score.numbers += 1
                if own is not None:
                    cands = [v for v in (own.get("z"), own.get("q")) if v is not None]
                    score.numbers_ok += int(_agrees(value, token, cands))
                else:
                    score.numbers_ok += int(_agrees(value, token, all_numbers))
            if own is not None and own.get("cox"):
                for m in re.finditer(r"Cox\s*([+-])", segment):
                    score.numbers += 1
                    score.numbers_ok += int(m.group(1) == own["cox"])
    return score
