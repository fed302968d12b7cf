"""The strict explanation checker: good texts pass; one hand-written bad text per rule is caught by exactly
that rule, naming the failing statement; real-looking bad demo outputs are caught; the aggregate."""

from __future__ import annotations

import copy
import json
from collections import defaultdict

import pytest

from oncofm.fusion.checker import RULES, CheckSettings, aggregate, check_explanation, format_check
from oncofm.fusion.templates import render_target

EV = {
    "cancer_type": "KIRC", "age": 61.0, "omics_prob": 0.64,
    "risk_genes": [{"gene": "TYRO3", "z": 2.1, "cox": "+", "q": 6.7e-05, "attribution": 0.21},
                   {"gene": "CA9", "z": 1.8, "cox": "+", "q": 0.012, "attribution": 0.12},
                   {"gene": "MKI67", "z": 0.7, "cox": "-", "q": 0.31, "attribution": 0.05}],
    "protective_genes": [{"gene": "ELF4", "z": -0.3, "cox": "-", "q": 0.6, "attribution": -0.18},
                         {"gene": "PBRM1", "z": 0.9, "cox": "-", "q": 0.04, "attribution": -0.09},
                         {"gene": "VHL", "z": -1.2, "cox": None, "q": None, "attribution": -0.02}],
    "slide_prob": 0.71,
    "image": {"n_patches": 812, "top_fraction": 0.1, "top_share": 0.34,
              "findings": [{"feature": "nuclei_density", "name": "nuclear density", "top": 0.5, "slide": 0.3,
                            "ratio": 1.67},
                           {"feature": "eosin_od", "name": "eosin stain", "top": 0.21, "slide": 0.25,
                            "ratio": 0.84}]},
    "missing": [],
}
OMICS_ONLY = {**copy.deepcopy(EV), "slide_prob": None, "image": None, "missing": ["slide"]}
SLIDE_ONLY = {**copy.deepcopy(EV), "omics_prob": None, "risk_genes": [], "protective_genes": [], "slide_prob": 0.3,
              "missing": ["omics"]}
OTHER_GENES = {"TP53", "EGFR", "BRCA1", "MYC", "KRAS", "PTEN", "CDKN2A", "HLA-A", "MET", "SETD2"}
VOCAB = {g["gene"] for g in EV["risk_genes"] + EV["protective_genes"]} | OTHER_GENES

# a hand-written good text in the style of the templates (significance words; the models related)
GOOD = (
    "This is a KIRC patient. The omics model gives a probability of 0.64 of death within 5 years. "
    "Genes that raise the risk: TYRO3 (z +2.1, Cox +, q 6.7e-05, significant); CA9 (z +1.8, Cox +, q 0.012, "
    "significant); MKI67 (z +0.7, Cox -, q 0.31, not significant). "
    "Genes that lower the risk: ELF4 (z -0.3, Cox -, q 0.6, not significant); PBRM1 (z +0.9, Cox -, q 0.04, "
    "significant); VHL (z -1.2). "
    "The slide model gives a probability of 0.71. The top 10% of patches hold 0.34 of the attention "
    "(concentrated). The most attended patches show nuclear density at 1.67 times the slide average. "
    "The stated risk of 0.66 lies between the omics model's 0.64 and the slide model's 0.71. "
    "Taken together, the evidence points to a high risk.\n"
    "Prediction: death within 5 years (risk 0.66)"
)
# without the sentence that restates the risk (for texts whose prediction line is changed or gone)
STATED = "The stated risk of 0.66 lies between the omics model's 0.64 and the slide model's 0.71. "
GOOD_NO_RISK = GOOD.replace(STATED, "")
# today's style: no significance words, no sentence relating the models
GOOD_PLAIN = (
    "The patient has KIRC, 61 years old. From gene expression, the omics model estimates a 5-year death "
    "probability of 0.64. Adverse genes: TYRO3 (z +2.1, Cox +, q 6.7e-05); CA9 (z +1.8, Cox +, q 0.012). "
    "Protective genes: ELF4 (z -0.3, Cox -, q 0.6). Attention is concentrated: 34% of it falls on the top 10% "
    "of patches. Overall, the findings are favourable.\n"
    "Prediction: alive at 5 years (risk 0.45)"
)


def check(text: str, ev: dict = EV, **settings):
    return check_explanation(text, ev, VOCAB, CheckSettings(**settings))


def sub(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


@pytest.mark.parametrize("ev", [EV, OMICS_ONLY, SLIDE_ONLY], ids=["both", "omics_only", "slide_only"])
def test_template_texts_pass(ev: dict) -> None:
    ref = ev["omics_prob"] if ev["omics_prob"] is not None else ev["slide_prob"]
    for seed in range(12):
        for death in (True, False):
            risk = round(min(max(ref + (0.1 if death else -0.1), 0.5 if death else 0.0), 1.0 if death else 0.49), 2)
            text = render_target(ev, death=death, risk=risk, seed=seed)
            r = check(text, ev)
            assert r.passed, (text, r.failures)
            assert r.faithfulness == 1.0 and r.prediction == {"death": death, "risk": risk}
            if ev["risk_genes"]:
                assert r.direction_consistency == 1.0 and r.genes_named == 6


@pytest.mark.parametrize("text", [GOOD, GOOD_PLAIN], ids=["significance", "plain"])
def test_hand_written_good_texts_pass(text: str) -> None:
    r = check(text)
    assert r.passed, r.failures
    assert r.numbers == r.numbers_ok > 5
    d = r.as_dict()
    assert d["passed"] and d["rules"] == [] and json.loads(json.dumps(d)) == d


# (rule, bad text, a piece of the statement the failure must name)
BAD = [
    ("wrong_direction",  # a protective gene listed among the genes that raise the risk
     sub(sub(GOOD, "q 0.31, not significant).", "q 0.31, not significant); ELF4 (z -0.3, Cox -, q 0.6, "
                                                "not significant)."),
         "ELF4 (z -0.3, Cox -, q 0.6, not significant); PBRM1", "PBRM1"),
     "Genes that raise the risk"),
    ("gene_in_both_lists",
     sub(GOOD, "VHL (z -1.2).", "VHL (z -1.2); CA9 (z +1.8, Cox +, q 0.012, significant)."),
     "Genes that lower the risk"),
    ("gene_not_in_evidence", sub(GOOD, "not significant). Genes", "not significant); TP53 (z +2.5). Genes"),
     "TP53 (z +2.5)"),
    ("number_not_in_evidence", sub(GOOD, "probability of 0.71.", "probability of 0.91."),
     "The slide model gives a probability of 0.91."),
    ("number_not_in_evidence", sub(GOOD, "Taken together", "The probability of death is 5.0 years. Taken together"),
     "The probability of death is 5.0 years."),
    ("number_not_in_evidence", sub(GOOD, "This is a KIRC patient.", "This is a KIRC patient aged 74 years."),
     "aged 74 years"),
    ("clinical_misstated", sub(GOOD, "This is a KIRC patient.", "This is a KIRC patient. Clinical record: stage "
                                                                "III."), "stage III"),
    ("gene_fact_wrong", sub(GOOD, "CA9 (z +1.8", "CA9 (z -1.8"), "CA9 (z -1.8"),
    ("gene_fact_wrong", sub(GOOD, "MKI67 (z +0.7, Cox -", "MKI67 (z +0.7, Cox +"), "MKI67 (z +0.7, Cox +"),
    ("gene_fact_wrong", sub(GOOD, "q 0.012", "q 0.12"), "CA9 (z +1.8, Cox +, q 0.12"),
    ("gene_fact_wrong", sub(GOOD, "VHL (z -1.2)", "VHL (z -1.2, Cox -)"), "VHL (z -1.2, Cox -)"),
    ("significance_misstated", sub(GOOD, "q 0.6, not significant", "q 0.6, significant"), "ELF4"),
    ("significance_misstated", sub(GOOD, "q 0.04, significant", "q 0.04, not significant"), "PBRM1"),
    ("significance_misstated", sub(GOOD, "VHL (z -1.2)", "VHL (z -1.2, significant)"), "VHL"),
    ("repeated_sentence",
     sub(GOOD, "Taken together", "The slide model gives a probability of 0.71. Taken together"),
     "The slide model gives a probability of 0.71."),
    ("ngram_loop",
     sub(GOOD, "Taken together", "The slide has a slide with a slide with a slide with a slide with tumour. "
                                 "Taken together"),
     "The slide has a slide with"),
    ("verdict_vs_models",
     sub(GOOD_NO_RISK, "(risk 0.66)", "(risk 0.95)"),
     "Prediction: death within 5 years (risk 0.95)"),
    ("verdict_words_vs_risk",
     sub(sub(GOOD, "(risk 0.66)", "(risk 0.45)"), "stated risk of 0.66", "stated risk of 0.45"),
     "Prediction: death within 5 years (risk 0.45)"),
    ("closing_vs_verdict", sub(GOOD, "points to a high risk", "points to a lower risk"),
     "Taken together, the evidence points to a lower risk."),
    ("malformed_prediction", GOOD_NO_RISK.split("\n")[0], "Taken together, the evidence points to a high risk."),
    ("malformed_prediction", sub(GOOD_NO_RISK, "death within 5 years (risk 0.66)", "maybe (risk high)"),
     "Prediction: maybe (risk high)"),
    ("malformed_prediction", sub(GOOD_NO_RISK, "(risk 0.66)", "(risk 1.7)"), "Prediction: death within 5 years (risk 1.7)"),
    ("malformed_prediction", GOOD + "\nPrediction: death within 5 years (risk 0.66)", "Prediction: death"),
    ("malformed_prediction", GOOD + "\nThe patient should be followed closely.", "followed closely"),
    ("malformed_prediction", GOOD + ". I hope this helps.", "I hope this helps"),
    ("malformed_prediction", sub(GOOD, "high risk.\nPrediction", "high risk. Prediction"), "high risk. Prediction"),
    ("truncated", GOOD.split(" PBRM1 (z +0.9")[0].rstrip(";") + " PBRM1 (z +0.9, Cox", "PBRM1 (z +0.9, Cox"),
    # the decoder appends the prediction line to a reasoning cut by the token limit
    ("truncated", GOOD_NO_RISK.split(" PBRM1 (z +0.9")[0].rstrip(";") + " PBRM1 (z +0.9, Cox\n"
     "Prediction: death within 5 years (risk 0.66)", "PBRM1 (z +0.9, Cox"),
    ("gene_fact_wrong", sub(GOOD_NO_RISK, "high risk.", "high risk. MKI67 has Cox +."), "MKI67 has Cox +."),
    ("modality_misstated", sub(GOOD, "Taken together", "There is no H&E slide for this patient. Taken together"),
     "There is no H&E slide for this patient."),
    ("cancer_type_misstated", sub(GOOD, "This is a KIRC patient.", "This is a BRCA patient."),
     "This is a BRCA patient."),
]


@pytest.mark.parametrize(("rule", "text", "statement"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_each_bad_text_is_caught_by_its_rule(rule: str, text: str, statement: str) -> None:
    r = check(text)
    assert not r.passed
    assert r.rules == [rule], r.failures
    assert any(statement in f.statement for f in r.failures), r.failures
    assert all(f.detail for f in r.failures)


#: rules about whole-slide image features need a record from the slide-feature model: their bad texts are in
#: tests/test_slide_feature_model.py::test_checker_catches_wrong_image_statements
IMAGE_RULES = {"image_feature_wrong", "image_feature_not_in_evidence"}
#: and rules about genomic alterations one with cited alterations: tests/test_alterations.py
ALTERATION_RULES = {"alteration_wrong", "alteration_not_in_evidence"}


def test_stage_and_grade_of_the_record_pass_and_others_fail() -> None:
    ev = {**copy.deepcopy(EV), "stage": 3, "grade": 2}
    good = sub(GOOD, "This is a KIRC patient.", "This is a KIRC patient. Clinical record: stage III, grade 2.")
    assert check_explanation(good, ev, VOCAB).passed
    for wrong in ("stage II, grade 2", "stage III, grade 3", "stage IV"):
        text = sub(GOOD, "This is a KIRC patient.", f"This is a KIRC patient. Clinical record: {wrong}.")
        assert "clinical_misstated" in check_explanation(text, ev, VOCAB).rules, wrong


def test_every_rule_has_a_bad_text() -> None:
    assert {b[0] for b in BAD} == set(RULES) - IMAGE_RULES - ALTERATION_RULES


def test_modality_reported_though_missing() -> None:
    text = ("This is a KIRC patient. The omics model gives a probability of 0.64 of death within 5 years. "
            "The slide model estimate is high. Taken together, the evidence points to a high risk.\n"
            "Prediction: death within 5 years (risk 0.66)")
    r = check(text, OMICS_ONLY)
    assert r.rules == ["modality_misstated"] and "The slide model estimate is high." in r.failures[0].statement
    assert check(text.replace("The slide model estimate is high. ", ""), OMICS_ONLY).passed


def test_direction_in_clauses_and_consistency() -> None:
    text = ("TYRO3 (z +2.1) raises the risk, while ELF4 (z -0.3) lowers it. CA9 lowers the risk.\n"
            "Prediction: death within 5 years (risk 0.7)")
    r = check(text)
    assert r.rules == ["wrong_direction"] and r.failures[0].statement == "CA9 lowers the risk."
    assert (r.directions, r.directions_ok) == (3, 2)


def test_tolerance_and_reference() -> None:
    line = "Taken together, the evidence points to a high risk.\nPrediction: death within 5 years (risk {})"
    assert check(line.format("0.89")).passed  # 0.25 from the omics model's 0.64
    assert check(line.format("0.90")).rules == ["verdict_vs_models"]
    assert check(line.format("0.90"), risk_tolerance=0.3).passed
    # slide model the reference when the omics model is missing
    assert check(line.format("0.60"), SLIDE_ONLY).rules == ["verdict_vs_models"]
    assert check(line.format("0.50"), SLIDE_ONLY).passed
    # the hull: within [min, max] of both models widened by the tolerance
    assert check(line.format("0.95"), verdict_reference="hull").passed
    assert check(line.format("0.97"), verdict_reference="hull").rules == ["verdict_vs_models"]


def test_horizon_and_age_are_legitimate_years() -> None:
    text = ("This is a KIRC patient, 61 years old. The omics model estimates a 5-year death probability of 0.64 "
            "(64%), i.e. death within 5 years. Overall, the findings are unfavourable.\n"
            "Prediction: death within 5 years (risk 0.66)")
    r = check(text)
    assert r.passed, r.failures
    assert check(text.replace("within 5 years.", "within 10 years.")).rules == ["number_not_in_evidence"]
    assert check(text.replace("(64%)", "(46%)")).rules == ["number_not_in_evidence"]


# real-looking bad outputs of the demo (rules a text must fail, at least)
DEMO_EV = {"cancer_type": "LUAD", "age": 67.0, "omics_prob": 0.94,
           "risk_genes": [{"gene": "EGFR", "z": 1.4, "cox": "+", "q": 0.2, "attribution": 0.3}],
           "protective_genes": [{"gene": "PTEN", "z": -0.8, "cox": "-", "q": 0.03, "attribution": -0.1}],
           "slide_prob": 0.17, "image": {"n_patches": 300, "top_fraction": 0.1, "top_share": 0.18, "findings": []},
           "missing": []}
DEMO = [
    ({"wrong_direction"}, "The patient has LUAD. Genes that raise the risk: EGFR (z +1.4); PTEN (z -0.8). Overall, "
                          "the findings are unfavourable.\nPrediction: death within 5 years (risk 0.9)"),
    ({"gene_in_both_lists"}, "Genes that raise the risk: EGFR; PTEN. Genes that lower the risk: PTEN. Overall, "
                             "the findings are unfavourable.\nPrediction: death within 5 years (risk 0.9)"),
    ({"repeated_sentence"}, "The omics model gives 0.94. The slide model probability is 0.17. The slide is "
                            "stained. The slide model probability is 0.17.\nPrediction: death within 5 years "
                            "(risk 0.9)"),
    ({"ngram_loop", "truncated"}, "The patient has LUAD. The slide has a slide with a slide with a slide with a "
                                  "slide with a slide with a slide with a slide with a slide with a"),
    ({"ngram_loop", "truncated"}, "The patient has LUAD. The slide has a slide with a slide with a slide with a "
                                  "slide with a slide with a\nPrediction: death within 5 years (risk 0.90)"),
    ({"number_not_in_evidence"}, "The patient has LUAD. The probability of death is 5.0 years.\n"
                                 "Prediction: death within 5 years (risk 0.9)"),
    ({"verdict_vs_models"}, "The omics model gives 0.94. The slide model gives 0.17.\n"
                            "Prediction: death within 5 years (risk 0.50)"),
    ({"verdict_words_vs_risk"}, "The omics model gives 0.94.\nPrediction: alive at 5 years (risk 0.81)"),
    ({"significance_misstated"}, "Adverse genes: EGFR (z +1.4, q 0.2, significant).\n"
                                 "Prediction: death within 5 years (risk 0.9)"),
    ({"gene_not_in_evidence"}, "Adverse genes: EGFR and KRAS. Overall, the findings are unfavourable.\n"
                               "Prediction: death within 5 years (risk 0.9)"),
    ({"malformed_prediction"}, "The omics model gives 0.94.\nPrediction: death within 5 years (risk 0.9)\n"
                               "Prediction: death within 5 years (risk 0.9)"),
    ({"repeated_sentence", "ngram_loop"}, "The slide model probability is 0.17. " * 4
                                          + "\nPrediction: death within 5 years (risk 0.9)"),
]


@pytest.mark.parametrize(("rules", "text"), DEMO, ids=[f"demo-{i}" for i in range(len(DEMO))])
def test_demo_failures_are_caught(rules: set[str], text: str) -> None:
    r = check_explanation(text, DEMO_EV, VOCAB)
    assert rules <= set(r.rules), r.failures
    assert set(r.rules) == rules, r.failures  # nothing else is blamed


def test_demo_slide_talk_without_a_slide() -> None:
    ev = {**DEMO_EV, "slide_prob": None, "image": None, "missing": ["slide"]}
    r = check_explanation("The patient has LUAD. The slide is a 10-day-old.\n"
                          "Prediction: death within 5 years (risk 0.90)", ev, VOCAB)
    assert r.rules == ["number_not_in_evidence", "modality_misstated"]
    assert {f.statement for f in r.failures} == {"The slide is a 10-day-old."}


def test_loop_rule_ignores_gene_facts_and_far_repeats() -> None:
    ev = copy.deepcopy(EV)
    for g in ev["risk_genes"] + ev["protective_genes"]:
        g.update(cox="-", q=1.0)  # six genes "(z ..., Cox -, q 1, not significant)"
    assert check(render_target(ev, death=True, risk=0.66, seed=0), ev).passed
    # the same 4-gram three times, but more than 50 words apart: not a loop
    pad = " ".join(f"Item {w} differs." for w in ("one", "two", "three", "four", "five", "six", "seven", "eight",
                                                  "nine", "ten", "eleven", "twelve", "thirteen", "fourteen",
                                                  "fifteen", "sixteen", "seventeen", "eighteen"))
    text = (f"Taken together, the evidence points to a high risk. {pad} Overall, the evidence points to a high "
            f"risk. {pad.lower()} Again, the evidence points to a high risk.\n"
            "Prediction: death within 5 years (risk 0.66)")
    assert check(text).passed, check(text).failures
    assert check(text, loop_window=200).rules == ["ngram_loop"]


def test_aggregate_and_format() -> None:
    repeated = next(b[1] for b in BAD if b[0] == "repeated_sentence")
    results = [check(t) for t in (GOOD, GOOD_PLAIN, BAD[0][1], repeated)]
    results.append(check_explanation(DEMO[3][1], DEMO_EV, VOCAB))
    assert results[-1].rules == ["ngram_loop", "truncated"]
    agg = aggregate(results)
    assert agg["n"] == 5 and agg["n_passed"] == 2 and agg["pass_rate"] == pytest.approx(0.4)
    assert set(agg["failure_counts"]) == set(RULES)
    assert agg["failure_counts"]["wrong_direction"] == 1 and agg["failure_counts"]["repeated_sentence"] == 1
    assert agg["failure_rates"]["ngram_loop"] == pytest.approx(0.2)
    assert agg["repeated_sentence_rate"] == pytest.approx(0.2)
    dirs = defaultdict(int)
    for r in results:
        dirs["n"] += r.directions
        dirs["ok"] += r.directions_ok
    assert agg["direction_consistency"] == pytest.approx(dirs["ok"] / dirs["n"]) and agg["direction_consistency"] < 1
    assert 0 < agg["faithfulness"] < 1
    line = format_check(agg)
    assert line.startswith("checker: pass rate 0.400 (2/5) | direction consistency")
    assert "wrong_direction 1" in line and "repeated_sentence 1" in line
    assert json.dumps(agg)
    empty = aggregate([])
    assert empty["n"] == 0 and empty["failure_counts"]["ngram_loop"] == 0


def test_format_metrics_prints_the_checker_line() -> None:
    from oncofm.fusion.evaluate import format_metrics

    m = defaultdict(lambda: 0.5)
    m["check"] = aggregate([check(GOOD), check(BAD[0][1])])
    lines = format_metrics(m)
    assert any(x.startswith("checker: pass rate 0.500 (1/2)") for x in lines)


def test_one_letter_symbols_and_the_cancer_type_are_not_genes() -> None:
    text = "This is a KIRC patient with T cells in the tumour.\nPrediction: death within 5 years (risk 0.66)"
    assert check_explanation(text, EV, VOCAB | {"T", "KIRC"}).passed
    assert check_explanation(text.replace("T cells", "TP53 cells"), EV, VOCAB).rules == ["gene_not_in_evidence"]
