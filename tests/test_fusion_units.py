"""Fusion units: parser, projectors, fused embedding, faithfulness, drafting client against a local server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from oncofm.fusion.faithfulness import score_faithfulness
from oncofm.fusion.parse import format_prediction, parse_prediction
from oncofm.fusion.projector import PROJECTORS, build_projector
from oncofm.fusion.templates import render_target

EVIDENCE = {
    "cancer_type": "KIRC", "age": 61.0, "omics_prob": 0.64,
    "risk_genes": [{"gene": "CA9", "z": 1.8, "cox": "+", "q": 0.012, "attribution": 0.2},
                   {"gene": "MKI67", "z": 2.1, "cox": "+", "q": 0.0031, "attribution": 0.1}],
    "protective_genes": [{"gene": "PBRM1", "z": 0.9, "cox": "-", "q": 0.04, "attribution": -0.15}],
    "slide_prob": 0.71,
    "image": {"n_patches": 812, "top_fraction": 0.1, "top_share": 0.34,
              "findings": [{"feature": "nuclei_density", "name": "nuclear density", "top": 0.5, "slide": 0.3,
                            "ratio": 1.67}]},
    "missing": [],
}
VOCAB = {"CA9", "MKI67", "PBRM1", "TP53", "EGFR", "VHL"}


@pytest.mark.parametrize(("text", "death", "risk"), [
    ("Some reasoning.\nPrediction: death within 5 years (risk 0.73)", True, 0.73),
    ("Prediction: alive at 5 years (risk 0.21)", False, 0.21),
    ("prediction:  Alive at 5 years  (risk 0.2).", False, 0.2),
    ("**Prediction:** death within 5 years (risk: 73%)", True, 0.73),
    ("Prediction: alive at 5 years (risk 0.9)\nPrediction: death within 5 years (risk 0.81)", True, 0.81),
    ("Prediction: death within 5 years (risk 1)", True, 1.0),
])
def test_parser_good(text: str, death: bool, risk: float) -> None:
    p = parse_prediction(text)
    assert p is not None and p.death is death and p.risk == pytest.approx(risk)


@pytest.mark.parametrize("text", [
    "", "No prediction here.", "Prediction: death within 5 years", "Prediction: maybe (risk 0.5)",
    "Prediction: alive at 5 years (risk high)", "Prediction: death within 5 years (risk 1.7)",
    "Prediction: alive at 10 years (risk 0.2)", "Prediction: death within 5 years (risk 0.7",
])
def test_parser_malformed(text: str) -> None:
    assert parse_prediction(text) is None


def test_format_roundtrip() -> None:
    for death in (True, False):
        for risk in (0.0, 0.05, 0.499, 1.0):
            p = parse_prediction(format_prediction(death, risk))
            assert p.death is death and p.risk == pytest.approx(round(risk, 2))


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_every_projector_shapes_and_grad(name: str) -> None:
    proj = build_projector(name, d_in=10, d_llm=16, n_tokens=3, out_scale=0.5)
    x = torch.randn(5, 10, requires_grad=True)
    y = proj(x)
    assert y.shape == (5, 3, 16)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in proj.parameters())
    with pytest.raises(ValueError):
        proj(torch.randn(5, 11))


def test_unknown_projector_is_an_error() -> None:
    from oncofm.errors import OncoFMError

    with pytest.raises(OncoFMError, match="unknown projector"):
        build_projector("qformer", d_in=4, d_llm=4, n_tokens=1)


def test_fused_embedding_learned_stand_in() -> None:
    from oncofm.fusion.fuse import FusedEmbedding

    f = FusedEmbedding(3, 2)
    o, s = torch.ones(2, 3), torch.full((2, 2), 5.0)
    out = f(o, s, torch.tensor([True, False]), torch.tensor([False, True]))
    assert out.shape == (2, 5)
    assert torch.equal(out[0, :3], o[0]) and torch.equal(out[0, 3:], f.missing_slide.detach())
    assert torch.equal(out[1, :3], f.missing_omics.detach()) and torch.equal(out[1, 3:], s[1])


def test_faithfulness_of_template_text_is_perfect() -> None:
    text = render_target(EVIDENCE, death=True, risk=0.66, seed=3)
    f = score_faithfulness(text, EVIDENCE, VOCAB)
    assert f.genes_named == 3 and f.directions == 3 and f.numbers >= 9
    assert f.faithfulness == 1.0 and f.hallucinated_gene_rate == 0.0


def test_faithfulness_hand_written() -> None:
    good = ("KIRC. The omics model gives 0.64. Genes that raise the risk: CA9 (z +1.8, Cox +, q 0.012). "
            "Protective genes: PBRM1 (z +0.9). The top 10% of patches hold 0.34 of the attention.\n"
            "Prediction: death within 5 years (risk 0.66)")
    f = score_faithfulness(good, EVIDENCE, VOCAB)
    assert (f.genes_named, f.genes_ok, f.directions, f.directions_ok) == (2, 2, 2, 2)
    assert f.numbers == f.numbers_ok == 7  # 0.64, 1.8, Cox +, 0.012, 0.9, 10%, 0.34; the risk line is not checked
    bad = ("Genes that raise the risk: PBRM1 (z +0.9) and TP53 (z +2.5). Genes that lower the risk: CA9 (z -1.8, "
           "Cox -). The omics model gives 0.91.\nPrediction: death within 5 years (risk 0.66)")
    f = score_faithfulness(bad, EVIDENCE, VOCAB)
    assert (f.genes_named, f.genes_ok) == (3, 2)  # TP53 is not in the evidence
    assert f.hallucinated_gene_rate == pytest.approx(1 / 3)
    assert (f.directions, f.directions_ok) == (2, 0)  # PBRM1 is protective, CA9 a risk gene
    # numbers: 0.9 ok (PBRM1 z), 2.5 (after TP53: not in evidence, any-number check) wrong,
    # -1.8 wrong sign, Cox - wrong, 0.91 wrong
    assert (f.numbers, f.numbers_ok) == (5, 1)
    assert f.faithfulness == pytest.approx((2 + 0 + 1) / (3 + 2 + 5))


class _ChatHandler(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        user = body["messages"][-1]["content"]
        reply = "The CA9 level is high." + ("\n" + user.splitlines()[-1] if "alive" in user else "")
        data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_drafting_client_against_local_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oncofm.fusion.drafting import DraftSettings, draft_explanations, export_for_review, import_reviewed

    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("ONCOFM_TEST_KEY", "sk-test")
        settings = DraftSettings(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="local-model",
                                 api_key_env="ONCOFM_TEST_KEY")
        records = [{"patient_id": "TCGA-AA-0001", "split": "train", "label": 0, "risk": 0.21, "evidence": EVIDENCE,
                    "target": "old"},
                   {"patient_id": "TCGA-AA-0002", "split": "train", "label": 1, "risk": 0.8, "evidence": EVIDENCE,
                    "target": "old"},
                   {"patient_id": "TCGA-AA-0003", "split": "train", "label": None, "risk": 0.5, "evidence": EVIDENCE,
                    "target": None}]
        drafts = draft_explanations(records, settings)
    finally:
        server.shutdown()
    assert len(drafts) == 2  # the unlabelled patient is not drafted
    req = _ChatHandler.requests[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "local-model" and "CA9" in req["body"]["messages"][-1]["content"]
    # the server's first answer carried the prediction line; the second did not and gets the canonical one
    assert parse_prediction(drafts[0]["draft"]).risk == 0.21
    assert parse_prediction(drafts[1]["draft"]) == parse_prediction(format_prediction(True, 0.8))
    # review loop through CSV: approve one (corrected) row, import into the dataset
    run = tmp_path / "run"
    (run / "reasoning").mkdir(parents=True)
    (run / "reasoning" / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    review = export_for_review(drafts, tmp_path / "review.csv")
    import csv

    rows = list(csv.DictReader(review.open()))
    rows[1]["corrected"] = "Corrected by the expert.\nPrediction: death within 5 years (risk 0.80)"
    rows[1]["approved"] = "yes"
    with review.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert import_reviewed(run, review) == 1
    new = [json.loads(x) for x in (run / "reasoning" / "dataset.jsonl").read_text().splitlines()]
    assert new[1]["target"].startswith("Corrected by the expert.") and new[1]["target_source"] == "expert"
    assert new[0]["target"] == "old"


def test_build_evidence_from_predictor_results() -> None:
    import numpy as np
    import pandas as pd

    from oncofm.fusion.evidence import Evidence, EvidenceSettings, build_evidence
    from oncofm.omics.predict import OmicsResult
    from oncofm.pathology.predict import SlideResult

    table = pd.DataFrame({"gene": ["A", "B", "C", "D"], "attribution": [1.0, -0.8, -0.4, 0.0],
                          "expression_z": [2.0, -1.0, 1.0, 3.0], "coef": [0.5, 0.8, -0.4, np.nan],
                          "q": [0.01, 0.02, 0.03, np.nan]})
    omics = OmicsResult(prob=0.734, logit=1.0, embedding=np.zeros(3, np.float32), attributions=table, n_present=4,
                        n_model_genes=4, missing_genes=[], version="t")
    attention = np.array([0.7, 0.1, 0.1, 0.05, 0.05])
    slide = SlideResult(prob=0.2, logit=-1.4, embedding=np.zeros(2, np.float32), attention=attention, version="t")
    ev = build_evidence("KIRC", 61.0, omics, slide, None, EvidenceSettings(top_genes=2, top_fraction=0.2))
    assert [g["gene"] for g in ev.risk_genes] == ["A"] and [g["gene"] for g in ev.protective_genes] == ["B", "C"]
    assert ev.risk_genes[0] == {"gene": "A", "z": 2.0, "cox": "+", "q": 0.01, "attribution": 1.0}
    assert ev.omics_prob == 0.73 and ev.slide_prob == 0.2 and ev.missing == []
    assert ev.image == {"n_patches": 5, "top_fraction": 0.2, "top_share": 0.7, "findings": []}
    assert Evidence.from_dict(ev.to_dict()) == ev
    assert "Risk genes: A z +2.0 Cox + q 0.01 significant" in ev.prompt() and 0.73 in ev.numbers()
    # a gene whose attribution contradicts its univariate Cox direction (z +1, coef -0.5: Cox says it lowers the
    # risk, the model says it raises it) is not cited under the default rule, and cited under "attribution"
    odd = pd.concat([table, pd.DataFrame({"gene": ["E"], "attribution": [0.9], "expression_z": [1.0],
                                          "coef": [-0.5], "q": [0.2]})], ignore_index=True)
    omics.attributions = odd
    assert [g["gene"] for g in build_evidence("KIRC", 61.0, omics, None, None, EvidenceSettings()).risk_genes] == ["A"]
    loose = build_evidence("KIRC", 61.0, omics, None, None, EvidenceSettings(gene_rule="attribution"))
    assert [g["gene"] for g in loose.risk_genes] == ["A", "E"]
    alone = build_evidence("KIRC", None, None, slide, None, EvidenceSettings())
    assert alone.missing == ["omics"] and alone.risk_genes == []


def test_attention_words_compare_with_uniform_attention_and_findings_need_a_reference() -> None:
    import numpy as np

    from oncofm.fusion.evidence import EvidenceSettings, build_evidence
    from oncofm.fusion.templates import render_target, uniform_share
    from oncofm.pathology.predict import PatchFinding, PatchSummary, SlideResult

    assert uniform_share(4, 0.1) == 0.25 and uniform_share(100, 0.1) == 0.1
    flat = SlideResult(prob=0.2, logit=0.0, embedding=np.zeros(1), attention=np.full(4, 0.25), version="t")
    patches = PatchSummary([PatchFinding(i, 0, 0, 0.25, np.zeros((1, 1, 3), np.uint8), {"nuclei_density": 1.0})
                            for i in range(4)], {"nuclei_density": 1.0})
    ev = build_evidence("KIRC", None, None, flat, patches, EvidenceSettings()).to_dict()
    assert ev["image"]["findings"] == []  # the attended patches are the whole slide: nothing to compare
    assert "spread out" in render_target(ev, death=False, risk=0.2)  # 1 of 4 patches holding 0.25 is uniform
    peaked = np.r_[0.91, np.full(99, 0.09 / 99)]
    ev = build_evidence("KIRC", None, None, SlideResult(0.2, 0.0, np.zeros(1), peaked, "t"), None,
                        EvidenceSettings()).to_dict()
    assert "concentrated" in render_target(ev, death=False, risk=0.2)


def test_a_slide_with_few_patches_names_its_one_most_attended_patch() -> None:
    import numpy as np

    from oncofm.fusion.checker import check_explanation
    from oncofm.fusion.evidence import EvidenceSettings, build_evidence
    from oncofm.fusion.templates import render_target
    from oncofm.pathology.predict import SlideResult

    few = SlideResult(prob=0.2, logit=0.0, embedding=np.zeros(1), attention=np.full(4, 0.25), version="t")
    ev = build_evidence("KIRC", None, None, few, None, EvidenceSettings()).to_dict()
    for seed in range(4):
        text = render_target(ev, death=False, risk=0.2, seed=seed)
        assert "of the 4 patches holds 0.25" in text or "most attended of the 4 patches holds 0.25" in text
        assert "top 10%" not in text and check_explanation(text, ev, set()).passed, text
