"""A strict checker of one generated explanation: faithfulness to the evidence record, consistency of the
verdict, fluency (no repeats, no loops) and the form of the prediction line.

:func:`check_explanation` returns a :class:`CheckResult`: ``passed`` (no failure) and one
:class:`Failure` ``(rule, statement, detail)`` per problem found, ``statement`` being the sentence (or the
prediction line) that fails, so a report can list it; :func:`aggregate` pools many results (pass rate,
per-rule counts and rates, direction consistency, repeated-sentence rate, faithfulness), and
:func:`format_check` prints the aggregate in one line (``oncofm evaluate-fusion``).

The text is split into its *body* and its prediction line(s) (any line segment that starts with
``Prediction:``); the body is split into sentences (as :mod:`oncofm.fusion.faithfulness` does), and a sentence
into clauses at *while / whereas / but / although / however*. The rules (:data:`RULES`, stable names):

Faithfulness (the body against the evidence record)

- ``gene_not_in_evidence``: a gene symbol of the vocabulary (the cohort's genes) is named that is not one of
  the record's risk or protective genes (the record's cancer type and one-letter symbols are never taken
  for a gene; a symbol is matched as a whole word, case-sensitively).
- ``wrong_direction``: a record gene is named in a clause whose direction words (templates' ``RISK_WORDS`` /
  ``PROTECTIVE_WORDS`` plus *risk gene(s)*, *increase(s) the risk*, *decrease(s) / reduce(s) the risk*, as
  whole words) say the opposite of its list; a clause with words of both directions, or none, states no
  direction.
- ``gene_in_both_lists``: one gene is named in a risk clause *and* in a protective clause (reported once per
  gene, instead of ``wrong_direction`` for that gene).
- ``gene_fact_wrong``: a fact written after a record gene, up to the next gene — ``z +1.8`` (agrees at the
  written decimals), ``q 0.012`` (agrees at the written significant digits), ``Cox +`` (the sign) — differs
  from that gene's value, or the record has no such value.
- ``significance_misstated``: after a record gene, *significant* / *not significant* (also *non-significant*,
  *insignificant*, *statistically …*) disagrees with its q-value: significant iff ``q < significance_q``
  (0.05); a gene without a q-value is never significant.
- ``number_not_in_evidence``: any other number (percentages /100) must agree, at its written decimals, with
  a number of the record, or with a *derived* number: the text's own stated risk, the absolute differences
  between the stated risk and the models' probabilities, the numbers of risk genes, protective genes and
  image findings, and ``significance_q``. A number right after a gene may also be that gene's z or q. A
  number followed by *year(s)* is a duration: only the horizon written ``5`` (``5 years``, ``5-year``) or the
  patient's age (``61 years old``) may be stated; so ``5.0 years`` fails (as in "the probability of death is
  5.0 years").
- ``modality_misstated``: the text says the slide (H&E) or the expression data is missing while the record
  has that model's probability, or — in a sentence without a negation (*no, not, without, missing, …*) —
  talks about a modality the record lacks: *slide(s), H&E, patch(es), attention, attended* without a slide,
  *omics, expression(-based), transcriptom…* without expression data.
- ``cancer_type_misstated``: *This is a X patient* / *The patient has X* / *Cancer type: X* /
  *diagnosed with X*, with X an upper-case code, names another cancer type than the record's.

- ``alteration_not_in_evidence``: a genomic alteration is stated — a gene symbol followed by a state word
  (*mutated / mutation / mutant / wild-type*, *amplification / amplified*, *(copy-number) gain*, *shallow /
  deep deletion*, *deletion / deleted*, *(copy-number) loss*) — that is not one of the record's cited
  alterations of that layer (mutation or copy number).
- ``alteration_wrong``: a record alteration is stated with another state (*amplification* for a deep
  deletion; *deletion* covers both deletion levels), a fact in the parentheses after it (``level -2``,
  ``Cox -``, ``q 0.001``, *(not) significant*) differs from the record, or its clause's direction (or the
  list's heading: "Genomic alterations that raise the risk: ...") is the opposite of the record's.

Consistency of the verdict (the prediction line against the models and the body)

- ``verdict_words_vs_risk``: the outcome words must say *death* iff the stated risk is >= 0.5.
- ``verdict_vs_models``: the stated risk must lie within ``risk_tolerance`` (0.25) of the *reference
  probability*: the omics model's probability when the record has one, else the slide model's; none, no
  check. With both models present the omics model is the reference (``verdict_reference: omics``, the
  default) because (1) the training targets' risk is the fused-embedding head, which on this project's data
  tracks the omics model (mean distance 0.026 on tcga13) — the omics model is by far the stronger of the
  two; (2) the alternative, "within [min, max] of the two widened by the tolerance" (``verdict_reference:
  hull``), accepts *any* risk when the models disagree strongly (omics 0.94, slide 0.17: the widened hull is
  [-0.08, 1.19]), which is exactly the verdict-unrelated-to-the-models failure this rule is for. A fused
  verdict that moves more than the tolerance away from the omics model towards the slide model is therefore
  flagged: a disagreement that large deserves a human look.
- ``closing_vs_verdict``: the body holds a templates' closing sentence (``CLOSINGS``) of the other outcome
  than the prediction line's words ("Overall, the findings are favourable." then "death within 5 years").

Fluency

- ``repeated_sentence``: a sentence of at least ``repeat_min_words`` (3) words occurs twice or more (case,
  spacing and the final full stop ignored); reported once per distinct sentence.
- ``ngram_loop``: a word n-gram (``loop_ngram`` = 4 words, lower case) occurs ``loop_repeats`` (3) times or
  more with all those occurrences starting within ``loop_window`` (50) consecutive words ("The slide has a
  slide with a slide with a slide with ..."). The contents of parentheses and the gene facts ``z …``,
  ``q …``, ``Cox ±``, *(not) significant* are not counted: ``q 1, not significant`` legitimately recurs.
  One failure per looping stretch.

The prediction line

- ``malformed_prediction``: the text must end in exactly one prediction line that
  :func:`oncofm.fusion.parse.parse_prediction` reads (risk in [0, 1]), that starts a line
  (``prediction_on_own_line``) and after which nothing follows (a trailing full stop or Markdown emphasis
  aside). Failures: no prediction line in a text that ends in a complete sentence; a malformed line
  (``Prediction: maybe (risk high)``, a risk above 1); two or more prediction lines; text after it.
- ``truncated``: the reasoning stops mid-sentence (does not end in ``.``, ``!`` or ``?``): it hit the token
  limit. Either there is no prediction line (then reported instead of ``malformed_prediction``), or the
  prediction line follows an unfinished sentence (the evaluation's decoder appends the prediction line under
  its grammar when the reasoning runs out of tokens).

A text *passes* when no rule fails. What the checker does not judge: whether the reasoning is clinically
sound, and claims without a number, gene or template keyword (it checks what it can parse, strictly).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from oncofm.fusion import evidence as _evidence
from oncofm.fusion.evidence import ALTERATION_RE, evidence_numbers, ordinal
from oncofm.fusion.faithfulness import _NUM, _WORD, _sentences
from oncofm.fusion.parse import PREDICTION_RE, ParsedPrediction, parse_prediction
from oncofm.fusion.templates import CLOSINGS, PROTECTIVE_WORDS, RISK_WORDS

__all__ = ["RULES", "CheckSettings", "Failure", "CheckResult", "check_explanation", "aggregate", "format_check"]

#: the rules, by stable name, with a one-line definition (module docstring for the details)
RULES: dict[str, str] = {
    "gene_not_in_evidence": "a vocabulary gene is named that is not a risk or protective gene of the record",
    "wrong_direction": "a record gene is named in a clause of the opposite direction to its list",
    "gene_in_both_lists": "a gene is named in both a risk clause and a protective clause",
    "gene_fact_wrong": "a z-score, q-value or Cox sign after a gene differs from that gene's record",
    "significance_misstated": "a gene is called (not) significant against its q-value (significant iff q < 0.05)",
    "number_not_in_evidence": "a number is neither a number of the record nor a derived one",
    "image_feature_not_in_evidence": "a whole-slide image feature is cited (with a percentile) that the record "
                                     "does not hold",
    "image_feature_wrong": "an image feature's percentile, its reference cancer type or the direction of its "
                           "clause differs from the record",
    "alteration_not_in_evidence": "a genomic alteration (gene + mutated / amplification / deletion ...) is stated "
                                  "that the record does not cite",
    "alteration_wrong": "a record alteration's state, level, Cox sign, q-value, significance or direction differs "
                        "from the record",
    "clinical_misstated": "a stage or grade is stated that differs from the record's (or the record has none)",
    "modality_misstated": "a modality is said to be missing though present, or a missing one is reported on",
    "cancer_type_misstated": "the text names another cancer type than the record's",
    "verdict_words_vs_risk": "the outcome words disagree with the stated risk (death iff risk >= 0.5)",
    "verdict_vs_models": "the stated risk is farther than the tolerance from the reference model probability",
    "closing_vs_verdict": "the closing sentence argues for the other outcome than the prediction line",
    "repeated_sentence": "a sentence occurs twice or more",
    "ngram_loop": "a word n-gram recurs in a short stretch of text (a decoding loop)",
    "malformed_prediction": "not exactly one well-formed prediction line at the end of the text",
    "truncated": "the reasoning stops mid-sentence (token limit), with or without a prediction line after it",
}


#: the templates' significance threshold (``evidence.SIGNIFICANCE_Q``), the default of ``significance_q``
_SIGNIFICANCE_Q = float(getattr(_evidence, "SIGNIFICANCE_Q", 0.05))

class CheckSettings(BaseModel):
    """The checker's thresholds (module docstring for how each is used)."""

    model_config = ConfigDict(extra="forbid")

    risk_tolerance: float = Field(0.25, ge=0, le=1, description="largest distance of the stated risk from the "
                                                                "reference model probability")
    verdict_reference: Literal["omics", "hull"] = Field(
        "omics", description="omics: the omics model's probability, else the slide model's; hull: within "
                             "[min, max] of the available models' probabilities widened by the tolerance")
    significance_q: float = Field(_SIGNIFICANCE_Q, gt=0, lt=1, description="a gene is significant iff its q < this "
                                                             "(the templates' threshold)")
    loop_ngram: int = Field(4, ge=2, description="words per n-gram of the loop rule")
    loop_repeats: int = Field(3, ge=2, description="occurrences of one n-gram that make a loop")
    loop_window: int = Field(50, ge=2, description="words within which those occurrences must start")
    repeat_min_words: int = Field(3, ge=1, description="shortest sentence (words) the repeated-sentence rule counts")
    prediction_on_own_line: bool = Field(True, description="the prediction line must start a line")


@dataclass(frozen=True)
class Failure:
    rule: str  # a key of RULES
    statement: str  # the failing sentence or prediction line, as written
    detail: str  # what is wrong, in words


_COUNTS = ("genes_named", "genes_in_evidence", "directions", "directions_ok", "numbers", "numbers_ok",
           "significance", "significance_ok", "image_features", "image_features_ok", "alterations",
           "alterations_ok", "sentences",
           "repeated_sentences")


@dataclass
class CheckResult:
    """One explanation's verdict: ``passed`` iff no failure; the counts behind the rates of :func:`aggregate`."""

    passed: bool
    failures: list[Failure] = field(default_factory=list)
    genes_named: int = 0  # gene mentions (vocabulary or record genes)
    genes_in_evidence: int = 0  # of those, record genes
    directions: int = 0  # record-gene mentions in a clause that states a direction
    directions_ok: int = 0  # of those, in the gene's own direction
    numbers: int = 0  # numbers and Cox signs checked
    numbers_ok: int = 0
    significance: int = 0  # significance words checked
    significance_ok: int = 0
    image_features: int = 0  # image-feature citations checked (name, percentile, reference, direction)
    image_features_ok: int = 0
    alterations: int = 0  # genomic-alteration citations checked (state, facts, direction)
    alterations_ok: int = 0
    sentences: int = 0  # sentences of the body
    repeated_sentences: int = 0  # distinct sentences that occur twice or more
    prediction: dict[str, Any] | None = None  # {"death", "risk"} of the parsed prediction line

    @property
    def rules(self) -> list[str]:
        """The failing rules, each once, in :data:`RULES` order."""
        failing = {f.rule for f in self.failures}
        return [r for r in RULES if r in failing] + sorted(failing - set(RULES))

    @property
    def claims(self) -> int:
        return (self.genes_named + self.directions + self.numbers + self.significance + self.image_features
                + self.alterations)

    @property
    def faithfulness(self) -> float:
        """Agreeing claims (genes, directions, numbers, significance words, image features, alterations) /
        claims; 1.0 with none."""
        ok = (self.genes_in_evidence + self.directions_ok + self.numbers_ok + self.significance_ok
              + self.image_features_ok + self.alterations_ok)
        return 1.0 if self.claims == 0 else ok / self.claims

    @property
    def direction_consistency(self) -> float | None:
        return None if self.directions == 0 else self.directions_ok / self.directions

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rules": self.rules, "failures": [asdict(f) for f in self.failures],
                **{k: getattr(self, k) for k in _COUNTS}, "faithfulness": self.faithfulness,
                "direction_consistency": self.direction_consistency, "prediction": self.prediction}


# --- patterns ---------------------------------------------------------------------------------------------


def _cues(words: tuple[str, ...]) -> re.Pattern:
    alts = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"\b(?:{alts})\b", re.IGNORECASE)


_RISK_CUES = _cues((*RISK_WORDS, "risk gene", "risk genes", "increase the risk", "increases the risk"))
_PROT_CUES = _cues((*PROTECTIVE_WORDS, "decrease the risk", "decreases the risk", "reduce the risk",
                    "reduces the risk"))
_CLAUSE = re.compile(r"(?=\s+\b(?:while|whereas|but|although|however)\b)", re.IGNORECASE)
_PRED_START = re.compile(r"[*_]*\s*\bprediction\s*[*_]*\s*[:：]", re.IGNORECASE)
_COMPLETE = re.compile(r"[.!?][\"')\]]*\s*$")
_YEARS = re.compile(r"\s*(?:-\s*)?(?:years?|yrs?)\b", re.IGNORECASE)
_Z = re.compile(r"\bz(?:[- ]?scores?)?\s*[:=]?\s*([+-]?\d+(?:\.\d+)?)(?!\d|\.\d)", re.IGNORECASE)
_Q = re.compile(r"\b(?:q(?:[- ]?values?)?|fdr)\s*[:=]?\s*(\d+(?:\.\d+)?(?:e[+-]?\d+)?)(?!\d|\.\d)",
                re.IGNORECASE)
_COX = re.compile(r"\bcox(?:\s+sign)?\s*[:=]?\s*([+-])(?!\d|\.\d)", re.IGNORECASE)
_SIG = re.compile(r"\b(?P<neg>not\s+(?:statistically\s+)?significant|non-?significant|insignificant)\b"
                  r"|\b(?:statistically\s+)?significant\b", re.IGNORECASE)
_NO_SLIDE = re.compile(r"\b(?:no|without)\s+(?:[\w&-]+\s+){0,2}?(?:slides?|h&e|histology)\b"
                       r"|\b(?:slide|h&e)\b[^.]*\b(?:is|are)\s+(?:missing|not available|unavailable)\b",
                       re.IGNORECASE)
_NO_OMICS = re.compile(r"\b(?:no|without)\s+(?:[\w&-]+\s+){0,2}?(?:expression|omics|rna|transcriptom\w*)\b"
                       r"|\b(?:expression|omics)\b[^.]*\b(?:is|are)\s+(?:missing|not available|unavailable)\b",
                       re.IGNORECASE)
_SLIDE_MODEL = re.compile(r"\b(?:slides?|h&e|patch(?:es)?|attention|attended)\b", re.IGNORECASE)
_OMICS_MODEL = re.compile(r"\b(?:omics|expression(?:-based)?|transcriptom\w*)\b", re.IGNORECASE)
_NEGATION = re.compile(r"\b(?:no|not|without|missing|unavailable|absent)\b", re.IGNORECASE)
_CANCER = re.compile(r"(?i:\b(?:this is an?|the patient has|cancer type\s*:|diagnosed with))\s+"
                     r"([A-Z][A-Z0-9]{1,9}(?:-[A-Z0-9]+)?)\b")
_PAREN = re.compile(r"\([^()]*\)")
_PERCENTILE = re.compile(r"\(\s*(\d+)(?:st|nd|rd|th) percentile of (all training|[A-Za-z0-9-]+) patients\s*\)",
                         re.IGNORECASE)
_IMAGE_MASK = "the image feature"
_ALT_MASK = "the alteration"
_MUTATION_WORDS = ("mutated", "mutation", "mutant", "wild-type", "wild type")
_ALTERATION = ALTERATION_RE
#: the words a text may use for each state of the record (evidence.ALTERATION_STATES plus synonyms)
_STATE_WORDS = {"mutated": {"mutated", "mutation", "mutant"}, "wild-type": {"wild-type", "wild type"},
                "amplification": {"amplification", "amplified"}, "copy-number gain": {"copy-number gain", "gain"},
                "no copy-number change": {"no copy-number change"},
                "shallow deletion": {"shallow deletion", "deletion", "deleted", "copy-number loss", "loss"},
                "deep deletion": {"deep deletion", "deletion", "deleted", "copy-number loss", "loss"},
                "copy-number loss": {"copy-number loss", "loss", "deletion", "deleted"}}
_LEVEL = re.compile(r"\blevel\s*[:=]?\s*([+-]?\d+(?:\.\d+)?)(?!\d|\.\d)", re.IGNORECASE)
_STAGE = re.compile(r"\bstage\s+(IV|III|II|I|[0-4])\b(?![-\w]|\.\d)", re.IGNORECASE)
_GRADE = re.compile(r"\bgrade\s+([0-4])\b(?![-\w]|\.\d)", re.IGNORECASE)
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4}
_FACTS = re.compile("|".join(f"(?:{p.pattern})" for p in (_Z, _Q, _COX, _SIG)), re.IGNORECASE)
_TOKEN = re.compile(r"[a-z0-9]+(?:[.'&+-][a-z0-9]+)*")


def _norm(sentence: str) -> str:
    return re.sub(r"\s+", " ", sentence.lower()).strip().rstrip(".!?").strip()


_DEATH_CLOSINGS = {_norm(d) for d, _ in CLOSINGS}
_ALIVE_CLOSINGS = {_norm(a) for _, a in CLOSINGS}


def _decimals(token: str) -> int:
    return len(token.split(".")[1]) if "." in token and "e" not in token.lower() else 0


def _agrees(value: float, token: str, candidates: list[float], pct: bool = False) -> bool:
    """``value`` (written ``token``) equals a candidate at the written precision."""
    if "e" in token.lower():
        return any(abs(value - c) <= abs(c) * 0.05 + 1e-12 for c in candidates)
    tol = 0.5 * 10 ** (-_decimals(token)) / (100.0 if pct else 1.0) + 1e-9
    return any(abs(value - c) <= tol for c in candidates)


def _significant_digits(token: str) -> int:
    mantissa = token.lower().lstrip("+-").split("e")[0].replace(".", "").lstrip("0")
    return max(1, len(mantissa))


def _q_agrees(token: str, q: float | None) -> bool:
    """A written q-value agrees with the record's at the written number of significant digits."""
    if q is None:
        return False
    d = _significant_digits(token)
    return math.isclose(float(f"{float(q):.{d}g}"), float(f"{float(token):.{d}g}"), rel_tol=1e-9, abs_tol=1e-15)


def _direction(clause: str) -> str | None:
    risk, prot = bool(_RISK_CUES.search(clause)), bool(_PROT_CUES.search(clause))
    if risk == prot:
        return None
    return "risk" if risk else "protective"


def _short(s: str, n: int = 300) -> str:
    s = s.strip()
    return s if len(s) <= n else s[: n - 1] + "…"


@dataclass
class _Attempt:
    line_no: int
    prefix: str  # text before it on its line
    text: str  # from "Prediction:" to the next attempt or the end of the line


def _split_prediction(lines: list[str]) -> tuple[str, list[_Attempt]]:
    """The body (every line without its prediction segments) and the prediction attempts."""
    body, attempts = [], []
    for i, line in enumerate(lines):
        starts = [m.start() for m in _PRED_START.finditer(line)]
        if not starts:
            body.append(line)
            continue
        if line[: starts[0]].strip():
            body.append(line[: starts[0]])
        for j, a in enumerate(starts):
            b = starts[j + 1] if j + 1 < len(starts) else len(line)
            attempts.append(_Attempt(i, line[: starts[0]] if j == 0 else "", line[a:b]))
    return "\n".join(body), attempts


# --- the checker ------------------------------------------------------------------------------------------


class _Check:
    def __init__(self, text: str, evidence: dict, vocabulary: set[str], settings: CheckSettings) -> None:
        self.text = (text or "").replace("\u2212", "-").replace("\r", "")
        self.ev, self.s = evidence, settings
        self.genes: dict[str, tuple[str, dict]] = {g["gene"]: ("risk", g) for g in evidence.get("risk_genes") or []}
        self.genes.update({g["gene"]: ("protective", g) for g in evidence.get("protective_genes") or []})
        # one-letter symbols (``T``) are too often plain letters ("T cells") to count as genes
        self.vocab = {g for g in vocabulary if len(g) > 1} | set(self.genes)
        self.vocab.discard(str(evidence.get("cancer_type") or ""))
        self.failures: list[Failure] = []
        self.n: Counter = Counter()
        self.lines = self.text.split("\n")
        self.body, self.attempts = _split_prediction(self.lines)
        self.sentences = _sentences(self.body)
        self.parsed: ParsedPrediction | None = parse_prediction(self.text)
        self.allowed = self._allowed_numbers()
        self.claims: dict[str, list[tuple[str, str]]] = defaultdict(list)  # gene -> [(direction, sentence)]
        self.image = {str(f["name"]).lower(): f for f in evidence.get("image_features") or []}
        self.alterations = {(str(a["gene"]), str(a["layer"])): a for a in evidence.get("alterations") or []}

    def fail(self, rule: str, statement: str, detail: str) -> None:
        self.failures.append(Failure(rule, _short(statement), detail))

    def _allowed_numbers(self) -> list[float]:
        ev = self.ev
        nums = evidence_numbers(ev)
        probs = [p for p in (ev.get("omics_prob"), ev.get("slide_prob")) if p is not None]
        if self.parsed is not None:
            nums.append(self.parsed.risk)
            nums += [abs(self.parsed.risk - p) for p in probs]
        if len(probs) == 2:
            nums.append(abs(probs[0] - probs[1]))
        findings = (ev.get("image") or {}).get("findings") or []
        nums += [len(ev.get("risk_genes") or []), len(ev.get("protective_genes") or []), len(findings),
                 self.s.significance_q]
        return [float(x) for x in nums]

    def run(self) -> CheckResult:
        self.check_prediction()
        self.check_verdict()
        for sentence in self.sentences:
            self.check_sentence(sentence)
        self.check_directions()
        self.check_repeats()
        self.check_loops()
        self.n["sentences"] = len(self.sentences)
        pred = None if self.parsed is None else {"death": self.parsed.death, "risk": self.parsed.risk}
        return CheckResult(passed=not self.failures, failures=self.failures, prediction=pred,
                           **{k: int(self.n[k]) for k in _COUNTS})

    # -- the prediction line and the verdict --

    def check_prediction(self) -> None:
        if not self.attempts:
            last = self.sentences[-1] if self.sentences else ""
            if self.body.strip() and not _COMPLETE.search(self.body):
                self.fail("truncated", last, "the text stops mid-sentence with no prediction line (token limit)")
            else:
                self.fail("malformed_prediction", last, "no prediction line")
            return
        first = self.attempts[0]
        reasoning = "\n".join([*self.lines[: first.line_no], first.prefix])
        if reasoning.strip() and not _COMPLETE.search(reasoning):
            before = _sentences(reasoning)
            self.fail("truncated", before[-1] if before else reasoning,
                      "the reasoning stops mid-sentence before the prediction line (token limit)")
        if len(self.attempts) > 1:
            self.fail("malformed_prediction", " | ".join(a.text.strip() for a in self.attempts),
                      f"{len(self.attempts)} prediction lines; exactly one is allowed")
        last = self.attempts[-1]
        line = last.text.strip()
        core = line.lstrip("*_ ")
        m = PREDICTION_RE.match(core)
        if m is None:
            self.fail("malformed_prediction", line, "not of the form 'Prediction: death within 5 years (risk 0.73)'"
                                                    " or 'Prediction: alive at 5 years (risk 0.21)'")
        else:
            risk = float(m.group("risk")) / (100.0 if m.group("pct") else 1.0)
            if not 0.0 <= risk <= 1.0:
                self.fail("malformed_prediction", line, f"risk {m.group('risk')} is outside [0, 1]")
            rest = core[m.end():].strip(" \t.*_")
            if rest:
                self.fail("malformed_prediction", line, f"text after the prediction: {_short(rest, 80)!r}")
        after = "\n".join(self.lines[last.line_no + 1:]).strip()
        if after:
            self.fail("malformed_prediction", after, "text after the prediction line")
        if self.s.prediction_on_own_line and last.prefix.strip():
            before = _sentences(last.prefix)
            self.fail("malformed_prediction", f"{before[-1].strip() if before else ''} {line}",
                      "the prediction line does not start a line")

    def check_verdict(self) -> None:
        p = self.parsed
        if p is None:
            return
        words = "death within 5 years" if p.death else "alive at 5 years"
        if p.death != (p.risk >= 0.5):
            self.fail("verdict_words_vs_risk", p.line, f"'{words}' with risk {p.risk:.2f}: the words must say "
                                                       "death iff the risk is >= 0.50")
        self._verdict_vs_models(p)
        for sentence in self.sentences:
            n = _norm(sentence)
            if (n in _DEATH_CLOSINGS and not p.death) or (n in _ALIVE_CLOSINGS and p.death):
                self.fail("closing_vs_verdict", sentence, f"the closing argues for the other outcome than '{words}'")

    def _verdict_vs_models(self, p: ParsedPrediction) -> None:
        probs = [(name, float(v)) for name, v in (("omics model", self.ev.get("omics_prob")),
                                                  ("slide model", self.ev.get("slide_prob"))) if v is not None]
        if not probs:
            return
        tol = self.s.risk_tolerance
        if self.s.verdict_reference == "omics" or len(probs) == 1:
            name, ref = probs[0]
            if abs(p.risk - ref) > tol + 1e-9:
                self.fail("verdict_vs_models", p.line, f"risk {p.risk:.2f} is {abs(p.risk - ref):.2f} from the "
                                                       f"{name}'s {ref:.2f} (tolerance {tol:.2f})")
            return
        lo, hi = min(v for _, v in probs) - tol, max(v for _, v in probs) + tol
        if not lo - 1e-9 <= p.risk <= hi + 1e-9:
            self.fail("verdict_vs_models", p.line, f"risk {p.risk:.2f} is outside [{lo:.2f}, {hi:.2f}] (the models' "
                                                   f"probabilities widened by {tol:.2f})")

    # -- one sentence: genes, facts, numbers, modalities, cancer type --

    def check_sentence(self, sentence: str) -> None:
        sentence = self._image_features(sentence)  # checked here; masked for the gene and number rules
        sentence = self._alterations(sentence)  # likewise
        self._clinical(sentence)
        self._modalities(sentence)
        self._cancer_type(sentence)
        unknown: set[str] = set()
        for clause in (c for c in _CLAUSE.split(sentence) if c):
            direction = _direction(clause)
            mentions = [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(clause) if m.group(0) in self.vocab]
            self._numbers(clause[: mentions[0][1]] if mentions else clause, sentence, None)
            for k, (gene, _, end) in enumerate(mentions):
                self.n["genes_named"] += 1
                if gene in self.genes:
                    self.n["genes_in_evidence"] += 1
                elif gene not in unknown:
                    unknown.add(gene)
                    self.fail("gene_not_in_evidence", sentence, f"{gene} is not a risk or protective gene of the record")
                if direction is not None:
                    self.claims[gene].append((direction, sentence))
                stop = mentions[k + 1][1] if k + 1 < len(mentions) else len(clause)
                self._numbers(clause[end:stop], sentence, gene)

    def _alterations(self, sentence: str) -> str:
        """Check every stated genomic alteration of ``sentence`` (:data:`_ALTERATION`) against the record's
        cited alterations and return the sentence with them (and their parenthesised facts) masked, so the
        gene and number rules do not read a mutated gene as an expression gene."""
        spans = []
        for m in _ALTERATION.finditer(sentence):
            gene, word = m.group(1), re.sub(r"\s+", " ", m.group(2).lower()).replace("copy number", "copy-number")
            layer = "mutation" if word in _MUTATION_WORDS else "cnv"
            if gene == str(self.ev.get("cancer_type") or ""):
                continue
            self.n["alterations"] += 1
            spans.append(m.span())
            own = self.alterations.get((gene, layer))
            if own is None:
                what = "mutation" if layer == "mutation" else "copy-number change"
                self.fail("alteration_not_in_evidence", sentence, f"{gene} {m.group(2)}: the record cites no {what} "
                                                                  f"of {gene}")
                continue
            problems = self._alteration_problems(own, word, m.group(2), m.group(3) or "")
            said = _direction(self._clause_at(sentence, m.start()))
            want = "risk" if own["effect"] == "raises" else "protective"
            if said is not None and said != want:
                problems.append(f"stated in a {said} clause; the record says it {own['effect']} the risk")
            if problems:
                self.fail("alteration_wrong", sentence, f"{gene} {own['state']}: " + "; ".join(problems))
            else:
                self.n["alterations_ok"] += 1
        for a, b in sorted(spans, reverse=True):
            sentence = f"{sentence[:a]} {_ALT_MASK}{sentence[b:]}"
        return sentence

    def _alteration_problems(self, own: dict, word: str, written: str, facts: str) -> list[str]:
        """What differs between a stated alteration (its state ``word`` and parenthesised ``facts``) and the
        record's ``own``."""
        problems = []
        if word not in _STATE_WORDS.get(str(own["state"]), {str(own["state"])}):
            problems.append(f"'{written}', the record has {own['state']}")
        for f in _LEVEL.finditer(facts):
            tok = f.group(1)
            if own.get("level") is None or not _agrees(float(tok), tok, [float(own["level"])]):
                problems.append(f"level {tok}, the record has {own.get('level')}")
        for f in _COX.finditer(facts):
            if f.group(1) != own.get("cox"):
                problems.append(f"Cox {f.group(1)}, the record has {own.get('cox')}")
        for f in _Q.finditer(facts):
            if not _q_agrees(f.group(1), own.get("q")):
                problems.append(f"q {f.group(1)}, the record has {own.get('q')}")
        for f in _SIG.finditer(facts):
            q = own.get("q")
            if (f.group("neg") is None) != (q is not None and float(q) < self.s.significance_q):
                problems.append(f"called '{f.group(0)}' with q {q}")
        return problems

    @staticmethod
    def _clause_at(sentence: str, pos: int) -> str:
        """The list item around ``pos`` (between ``;`` / ``:``) with the sentence's heading before its first
        ``:`` ("Image features that raise the risk: a (..); b (..)": the heading states the direction)."""
        whole = next((m.group(0) for m in re.finditer(r"[^;:]+", sentence) if m.start() <= pos < m.end()), sentence)
        head = sentence[: sentence.find(":")] if ":" in sentence else ""
        return f"{head} {whole}"

    def _image_features(self, sentence: str) -> str:
        """Check every cited image feature of ``sentence`` — ``<name> (92nd percentile of LUAD patients)`` and
        any record feature named without a percentile — and return the sentence with them masked (their
        names hold numbers such as "80 µm" that are part of the name, not claims)."""
        spans: list[tuple[int, int]] = []

        def direction_ok(f: dict, pos: int, stmt: str) -> bool:
            said = _direction(self._clause_at(sentence, pos))
            want = "risk" if f["effect"] == "raises" else "protective"
            if said is not None and said != want:
                self.fail("image_feature_wrong", stmt, f"'{f['name']}' is stated in a {said} clause; the record "
                                                       f"says it {f['effect']} the risk")
                return False
            return True

        for m in _PERCENTILE.finditer(sentence):
            before = sentence[: m.start()].rstrip().lower()
            name = next((n for n in sorted(self.image, key=len, reverse=True) if before.endswith(n)), None)
            if name is not None:
                start = len(before) - len(name) - 1
            else:  # not a record feature: the words since the list's last separator, for the message
                start = max(sentence.rfind(c, 0, m.start()) for c in ":;,")
                name = sentence[start + 1: m.start()].strip()
            self.n["image_features"] += 1
            own = self.image.get(name.lower())
            if own is None:
                self.fail("image_feature_not_in_evidence", sentence, f"'{name}' is not an image feature of the record")
                spans.append((start + 1, m.end()))
                continue
            ok = direction_ok(own, m.start(), sentence)
            pct, ref = int(m.group(1)), m.group(2)
            want_ref = "all training" if (own.get("reference") or "all") == "all" else str(own["reference"])
            if own.get("percentile") is None or pct != int(own["percentile"]) or ref.lower() != want_ref.lower():
                self.fail("image_feature_wrong", sentence, f"'{name}': {ordinal(pct)} percentile of {ref} "
                                                           f"patients; the record has {own.get('percentile')} of "
                                                           f"{want_ref}")
                ok = False
            self.n["image_features_ok"] += ok
            spans.append((start + 1, m.end()))
        low = sentence.lower()
        for name, own in self.image.items():  # a record feature named without its percentile
            for m in re.finditer(re.escape(name), low):
                if any(a <= m.start() < b for a, b in spans):
                    continue
                self.n["image_features"] += 1
                self.n["image_features_ok"] += direction_ok(own, m.start(), sentence)
                spans.append(m.span())
        for a, b in sorted(spans, reverse=True):
            sentence = f"{sentence[:a]} {_IMAGE_MASK}{sentence[b:]}"
        return sentence

    def _clinical(self, sentence: str) -> None:
        for pattern, key in ((_STAGE, "stage"), (_GRADE, "grade")):
            for m in pattern.finditer(sentence):
                token = m.group(1).upper()
                said = _ROMAN.get(token) if key == "stage" and token in _ROMAN else int(token)
                own = self.ev.get(key)
                if own is None or int(own) != said:
                    self.fail("clinical_misstated", sentence, f"{key} {m.group(1)}: the record's {key} is "
                                                              f"{'unknown' if own is None else own}")

    def _mask_image_names(self, sentence: str) -> str:
        for name in sorted(self.image, key=len, reverse=True):
            sentence = re.sub(re.escape(name), " ", sentence, flags=re.IGNORECASE)
        return sentence

    def _numbers(self, segment: str, sentence: str, gene: str | None) -> None:
        """The numbers of ``segment``: facts of ``gene`` (the gene it follows; None = no gene), then the rest."""
        consumed: list[tuple[int, int]] = []
        if gene is not None:
            own = self.genes.get(gene, (None, None))[1]
            consumed = self._gene_facts(segment, sentence, gene, own)
        else:
            own = None
        for m in _NUM.finditer(segment):
            if any(a <= m.start(1) < b for a, b in consumed):
                continue
            self._free_number(m, segment, sentence, own)

    def _gene_facts(self, segment: str, sentence: str, gene: str, own: dict | None) -> list[tuple[int, int]]:
        spans = [m.span(1) for pat in (_Z, _Q) for m in pat.finditer(segment)]
        if own is None:  # a gene outside the record: its facts cannot be checked (gene_not_in_evidence)
            return spans
        for m in _Z.finditer(segment):
            tok = m.group(1)
            self._fact(own.get("z") is not None and _agrees(float(tok), tok, [float(own["z"])]), sentence,
                       f"{gene}: z {tok}, the record has {own.get('z')}")
        for m in _Q.finditer(segment):
            tok = m.group(1)
            self._fact(_q_agrees(tok, own.get("q")), sentence, f"{gene}: q {tok}, the record has {own.get('q')}")
        for m in _COX.finditer(segment):
            self._fact(m.group(1) == own.get("cox"), sentence,
                       f"{gene}: Cox {m.group(1)}, the record has {own.get('cox')}")
        for m in _SIG.finditer(segment):
            said = m.group("neg") is None
            q = own.get("q")
            truth = q is not None and float(q) < self.s.significance_q
            self.n["significance"] += 1
            if said == truth:
                self.n["significance_ok"] += 1
            else:
                self.fail("significance_misstated", sentence,
                          f"{gene} is called '{m.group(0)}' but its q is {q} (significant iff q < "
                          f"{self.s.significance_q:g})")
        return spans

    def _fact(self, ok: bool, sentence: str, detail: str) -> None:
        self.n["numbers"] += 1
        if ok:
            self.n["numbers_ok"] += 1
        else:
            self.fail("gene_fact_wrong", sentence, detail)

    def _free_number(self, m: re.Match, segment: str, sentence: str, own: dict | None) -> None:
        token, pct = m.group(1), bool(m.group(2))
        if _YEARS.match(segment[m.end(): m.end() + 12]):
            if token == "5":
                return  # the 5-year horizon
            age = self.ev.get("age")
            ok = age is not None and not pct and _agrees(float(token), token, [float(age)])
            detail = f"'{token} years' is neither the 5-year horizon (written 5) nor the patient's age"
        else:
            value = float(token) / (100.0 if pct else 1.0)
            cands = self.allowed + ([float(own[k]) for k in ("z", "q") if own.get(k) is not None] if own else [])
            ok = _agrees(value, token, cands, pct)
            detail = f"{token}{'%' if pct else ''} is not a number of the evidence record"
        self.n["numbers"] += 1
        if ok:
            self.n["numbers_ok"] += 1
        else:
            self.fail("number_not_in_evidence", sentence, detail)

    def _modalities(self, sentence: str) -> None:
        for name, key, says_missing, reports in (("slide", "slide_prob", _NO_SLIDE, _SLIDE_MODEL),
                                                 ("expression (omics)", "omics_prob", _NO_OMICS, _OMICS_MODEL)):
            present = self.ev.get(key) is not None
            if present and says_missing.search(sentence):
                self.fail("modality_misstated", sentence,
                          f"says the {name} data is missing, but the record has the model's probability "
                          f"{float(self.ev[key]):.2f}")
            elif not present and reports.search(sentence) and not _NEGATION.search(sentence):
                self.fail("modality_misstated", sentence, f"reports on {name} data, but the record has none")

    def _cancer_type(self, sentence: str) -> None:
        ct = str(self.ev.get("cancer_type") or "").upper()
        for m in _CANCER.finditer(sentence):
            code = m.group(1).upper()
            if not ct or m.group(1) in self.vocab or code == ct or ct.endswith("-" + code) or code.endswith("-" + ct):
                continue
            self.fail("cancer_type_misstated", sentence, f"names {m.group(1)}, the record's cancer type is {ct}")

    # -- whole-text rules --

    def check_directions(self) -> None:
        for gene, claims in self.claims.items():
            own = self.genes.get(gene)
            if own is not None:
                self.n["directions"] += len(claims)
                self.n["directions_ok"] += sum(d == own[0] for d, _ in claims)
            if len({d for d, _ in claims}) == 2:
                wrong = next((s for d, s in claims if own is not None and d != own[0]),
                             next(s for d, s in claims if d != claims[0][0]))
                listed = f"; the record lists it as a {own[0]} gene" if own else ""
                self.fail("gene_in_both_lists", wrong, f"{gene} is named among both the risk and the protective "
                                                       f"genes{listed}")
            elif own is not None:
                for d, s in claims:
                    if d != own[0]:
                        self.fail("wrong_direction", s, f"{gene} is named as a {d} gene; the record lists it as "
                                                        f"a {own[0]} gene")

    def check_repeats(self) -> None:
        seen: dict[str, list[str]] = defaultdict(list)
        for s in self.sentences:
            n = _norm(s)
            if len(n.split()) >= self.s.repeat_min_words:
                seen[n].append(s)
        for group in seen.values():
            if len(group) > 1:
                self.n["repeated_sentences"] += 1
                self.fail("repeated_sentence", group[0], f"stated {len(group)} times")

    def check_loops(self) -> None:
        words: list[tuple[str, int]] = []
        for i, s in enumerate(self.sentences):
            plain = _FACTS.sub(" ", _PAREN.sub(" ", self._mask_image_names(s)))  # facts and image-feature
            # names (long, with shared words: "cancer cells within 80 µm of ...") may legitimately recur
            words += [(w, i) for w in _TOKEN.findall(plain.lower())]
        n, r, window = self.s.loop_ngram, self.s.loop_repeats, self.s.loop_window
        positions: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for k in range(len(words) - n + 1):
            positions[tuple(w for w, _ in words[k: k + n])].append(k)
        covered: list[tuple[int, int]] = []
        for gram, pos in positions.items():
            hit = next((j for j in range(len(pos) - r + 1) if pos[j + r - 1] - pos[j] < window), None)
            if hit is None or any(a <= pos[hit] <= b for a, b in covered):
                continue
            covered.append((pos[hit], pos[-1] + n))
            self.fail("ngram_loop", self.sentences[words[pos[hit]][1]],
                      f"'{' '.join(gram)}' occurs {len(pos)} times ({r} within {window} words)")


def check_explanation(text: str, evidence: dict, gene_vocabulary: set[str],
                      settings: CheckSettings | None = None) -> CheckResult:
    """Check one explanation against its evidence record (the dict form of
    :class:`~oncofm.fusion.evidence.Evidence`); ``gene_vocabulary``: the gene symbols a text might name (the
    cohort's genes; the record's genes are always included)."""
    return _Check(text, evidence, gene_vocabulary, settings or CheckSettings()).run()


def aggregate(results: list[CheckResult]) -> dict[str, Any]:
    """Pool many results: pass rate; per rule the texts failing it (``failure_counts``, ``failure_rates``) and
    its failures (``failure_instances``), every rule listed; direction consistency (record-gene mentions in
    their own direction / record-gene mentions in a directional clause); repeated-sentence rate (texts with a
    repeated sentence / texts); faithfulness (pooled agreeing claims / claims)."""
    n = len(results)
    texts = Counter(rule for r in results for rule in r.rules)
    instances = Counter(f.rule for r in results for f in r.failures)
    tot = {k: sum(getattr(r, k) for r in results) for k in _COUNTS}
    claims = tot["genes_named"] + tot["directions"] + tot["numbers"] + tot["significance"]
    ok = tot["genes_in_evidence"] + tot["directions_ok"] + tot["numbers_ok"] + tot["significance_ok"]
    nan = float("nan")
    rules = list(RULES) + sorted(set(texts) - set(RULES))
    n_passed = sum(r.passed for r in results)
    return {
        "n": n, "n_passed": n_passed, "pass_rate": n_passed / n if n else nan,
        "failure_counts": {k: texts[k] for k in rules},
        "failure_rates": {k: texts[k] / n if n else nan for k in rules},
        "failure_instances": {k: instances[k] for k in rules},
        "direction_consistency": tot["directions_ok"] / tot["directions"] if tot["directions"] else nan,
        "repeated_sentence_rate": texts["repeated_sentence"] / n if n else nan,
        "faithfulness": ok / claims if claims else (1.0 if n else nan),
        **tot,
    }


def format_check(agg: dict[str, Any]) -> str:
    """The aggregate in one line: pass rate, direction consistency, repeated-sentence rate, failing rules."""
    fails = ", ".join(f"{k} {v}" for k, v in sorted(agg["failure_counts"].items(), key=lambda kv: -kv[1]) if v)
    cited = "".join(f" | {what} faithful {agg[f'{key}_ok']}/{agg[key]}" for key, what in
                    (("image_features", "image-feature citations"), ("alterations", "alteration citations"))
                    if agg.get(key))
    return (f"checker: pass rate {agg['pass_rate']:.3f} ({agg['n_passed']}/{agg['n']}) | direction consistency "
            f"{agg['direction_consistency']:.3f} | repeated-sentence rate {agg['repeated_sentence_rate']:.3f} | "
            f"faithfulness {agg['faithfulness']:.3f}{cited} | texts failing: {fails or 'none'}")
