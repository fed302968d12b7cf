"""Fusion stage end to end on a tiny LLM built from a config (no download): reasoning → train → generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from oncofm.fusion.parse import parse_prediction


def _write_upstream(run: Path, n_genes: int = 40, d: int = 8, seed: int = 0) -> None:
    """Synthetic omics/slide artifacts following docs/CONTRACTS.md for the real cohort in ``run``.

    Planted answer: embedding dimension e0 carries the 5-year label, so the fused head must find it.
    """
    from oncofm.cohort.importing import load_patients
    from oncofm.cohort.schema import five_year_labels

    rng = np.random.default_rng(seed)
    patients = load_patients(run)
    ids = patients["patient_id"].astype(str).to_numpy()
    y = five_year_labels(patients).reindex(ids).fillna(0.5).to_numpy()
    emb = rng.normal(size=(len(ids), d)).astype(np.float32)
    emb[:, 0] += 2.0 * (y - 0.5)
    omics = run / "models" / "omics"
    omics.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(emb, index=pd.Index(ids, name="patient_id"), columns=[f"e{i}" for i in range(d)]).to_parquet(
        omics / "embeddings.parquet")
    prob = 1 / (1 + np.exp(-emb[:, 0]))
    pd.DataFrame({"patient_id": ids, "split": "train", "prob": prob, "risk": emb[:, 0]}).to_parquet(
        omics / "predictions.parquet")
    expr = pd.read_parquet(run / "cohort" / "expression.parquet")
    genes = list(expr.columns[:n_genes])
    att = pd.DataFrame({"patient_id": np.repeat(ids, len(genes)), "gene": np.tile(genes, len(ids)),
                        "attribution": rng.normal(size=len(ids) * len(genes))})
    att.to_parquet(omics / "attributions.parquet")
    cts = patients["cancer_type"].astype(str).unique()
    cox = pd.DataFrame([{"gene": g, "cancer_type": ct, "horizon_years": 5.0, "coef": rng.normal(), "se": 0.1,
                         "z": 1.0, "p": 0.1, "q": float(rng.uniform(0.001, 0.5)), "n": 100, "events": 30,
                         "converged": True, "note": ""} for g in genes for ct in cts])
    (run / "cox").mkdir(exist_ok=True)
    cox.to_parquet(run / "cox" / "coefficients.parquet")
    # slide embeddings for a few patients only: most patients miss the slide modality (as in real data)
    slide = run / "models" / "slide"
    slide.mkdir(parents=True, exist_ok=True)
    few = ids[:30]
    pd.DataFrame(rng.normal(size=(len(few), 6)).astype(np.float32), index=pd.Index(few, name="patient_id"),
                 columns=[f"e{i}" for i in range(6)]).to_parquet(slide / "embeddings.parquet")
    pd.DataFrame({"patient_id": few, "slide_id": [f"{p}-01Z-00-DX1.svs" for p in few], "split": "train",
                  "prob": rng.uniform(size=len(few))}).to_parquet(slide / "predictions.parquet")
    (slide / "attention").mkdir(exist_ok=True)
    a = rng.dirichlet(np.ones(50) * 0.3)
    pd.DataFrame({"x": np.arange(50) * 224, "y": 0, "attention": a}).to_parquet(
        slide / "attention" / f"{few[0]}-01Z-00-DX1.parquet")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a loaded 2-core machine, thread contention makes tiny models 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fusion_run(tcga13_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from oncofm.fusion.reasoning import ReasoningSettings, build_reasoning_dataset

    run = tmp_path_factory.mktemp("fusion_run")
    shutil.copytree(tcga13_run / "cohort", run / "cohort")
    _write_upstream(run)
    from oncofm.fusion.evidence import EvidenceSettings

    build_reasoning_dataset(ReasoningSettings(run=str(run), evidence=EvidenceSettings(top_genes=2)))
    return run


def _pretrain(model: torch.nn.Module, tokenizer: object, texts: list[str], steps: int = 120) -> None:
    """Stand-in for pre-training: a few full-parameter steps of language modelling on plain target texts
    (no prompt, no soft tokens), so the tiny base model speaks the explanations' language before LoRA."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (8,), generator=g)
        loss = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                     labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _tiny_llm_dir(records: list[dict], out: Path) -> Path:
    """A tiny Llama (2 layers, 64 wide) and a BPE tokenizer trained on the records' texts, saved as a HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from oncofm.fusion.evidence import evidence_prompt
    from oncofm.fusion.model import SYSTEM_PROMPT, USER_PROMPT

    texts = ([r["target"] for r in records if r["target"]] + [evidence_prompt(r["evidence"]) for r in records]
             + [SYSTEM_PROMPT, USER_PROMPT])
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 2, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    _pretrain(model, hf_tok, [r["target"] for r in records if r["target"]])
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def test_reasoning_dataset_on_real_cohort(fusion_run: Path) -> None:
    from oncofm.fusion.parse import parse_prediction
    from oncofm.fusion.reasoning import read_dataset

    records = read_dataset(fusion_run)
    splits = pd.read_parquet(fusion_run / "cohort" / "splits.parquet")
    assert len(records) == len(splits)
    with_target = [r for r in records if r["target"]]
    assert all(r["label"] is not None for r in with_target)
    assert all(r["target"] is None for r in records if r["label"] is None)
    for r in with_target:
        lines = [ln for ln in r["target"].splitlines() if ln.startswith("Prediction:")]
        assert len(lines) == 1 and r["target"].rstrip().endswith(lines[0])
        p = parse_prediction(r["target"])
        assert p is not None and p.death == bool(r["label"]) and p.risk == pytest.approx(r["risk"], abs=0.006)
    # the stacked head is fitted on validation: validation risks are out-of-fold, every other split uses the fit
    assert {r["risk_source"] for r in records if r["split"] == "val" and r["label"] is not None} == {
        "stacked_head_oof"}
    assert {r["risk_source"] for r in records if r["split"] in ("train", "test")} == {"stacked_head"}
    # the planted signal (e0 carries the label) is found by the fused head on the test split
    head = pd.read_parquet(fusion_run / "reasoning" / "fused_head.parquet")
    t = head[(head["split"] == "test") & head["label"].notna()]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(t["label"], t["prob"]) > 0.8
    # slides for a few patients only: the rest list the slide as missing; one has attention findings
    missing_slide = sum("slide" in r["evidence"]["missing"] for r in records)
    assert len(records) - 30 <= missing_slide < len(records)
    assert any(r["evidence"]["image"] and r["evidence"]["image"]["top_share"] > 0.1 for r in records)
    ev = with_target[0]["evidence"]
    assert len(ev["risk_genes"]) == 2 and all(g["cox"] in "+-" for g in ev["risk_genes"])
    assert all(g["attribution"] > 0 for g in ev["risk_genes"]) and all(g["attribution"] < 0 for g in ev["protective_genes"])


@pytest.mark.slow
def test_tiny_llm_trains_and_generation_parses(fusion_run: Path, tmp_path: Path) -> None:
    from oncofm.fusion.evaluate import FusionEvaluateSettings, evaluate_fusion, format_metrics
    from oncofm.fusion.llm import LLMSettings
    from oncofm.fusion.reasoning import read_dataset
    from oncofm.fusion.train import FusionSettings, train_fusion
    from oncofm.training import TrainSettings

    run = tmp_path / "run"
    shutil.copytree(fusion_run, run)
    records = read_dataset(run)
    llm_dir = _tiny_llm_dir(records, tmp_path / "tiny_llm")
    settings = FusionSettings(
        run=str(run), llm=LLMSettings(model_path=str(llm_dir)), projector="linear", n_soft_tokens=2, lora_r=8,
        lora_alpha=16, lora_targets=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], max_train_patients=24,
        max_val_patients=8, train=TrainSettings(epochs=8, batch_size=8, lr=2e-2, patience=8, progress=False))
    paths = train_fusion(settings)
    for p in paths.values():
        assert p.exists()
    import yaml

    cfg = yaml.safe_load(paths["config"].read_text())
    losses = [h["train_loss"] for h in cfg["history"]]
    assert losses[-1] < 0.7 * losses[0]  # the loss falls
    metrics = evaluate_fusion(FusionEvaluateSettings(run=str(run), max_eval_patients=6, max_new_tokens=160))
    assert metrics["n_generated"] == 6
    assert metrics["readout"] == "marginal" and len(metrics["auc_text_minus_omics_model"]) == 3
    assert any("minus omics model" in line for line in format_metrics(metrics))
    gens = [line for line in (run / "models" / "fusion" / "generations.jsonl").read_text().splitlines() if line]
    assert len(gens) == 6
    assert metrics["parse_rate"] == 1.0, gens[:2]  # the prediction line is decoded under its grammar
    from oncofm.fusion.templates import CLOSINGS, slot_options

    for g in map(json.loads, gens):  # ... which ties the words to the number: death iff risk >= 0.5
        assert g["death"] == (g["risk"] >= 0.5), g["generated"][-60:]
        # structured decoding (the default): one sentence per slot, in order, then a closing of the verdict's side
        reasoning = g["generated"].rsplit("\nPrediction:", 1)[0]
        expected = slot_options(g["evidence"])
        rest = reasoning
        for options in expected:
            hit = next(o for o in options if rest.startswith(o))
            rest = rest[len(hit):].lstrip()
        assert rest in {pair[0 if g["death"] else 1] for pair in CLOSINGS}, rest
    assert (run / "models" / "fusion" / "expert_rating.csv").exists()
    assert (run / "models" / "fusion" / "expert_rating.html").exists()
    # the contract: the product's predictor reproduces the stored evaluation generation (same decoding:
    # batch 1, fp32, merged LoRA), and a missing slide goes through its learned stand-in
    from oncofm.fusion.fuse import load_embeddings
    from oncofm.fusion.predict import FusionPredictor
    from oncofm.paths import RunLayout

    metrics = evaluate_fusion(FusionEvaluateSettings(run=str(run), max_eval_patients=2, max_new_tokens=160,
                                                     batch_size=1, precision="fp32", timed_alone=0))
    stored = [json.loads(line) for line in (run / "models" / "fusion" / "generations.jsonl").read_text().splitlines()]
    predictor = FusionPredictor.from_run(RunLayout(run))
    by_id = {r["patient_id"]: r for r in records}
    for g in stored:
        emb = load_embeddings(run, [g["patient_id"]])
        out = predictor.generate([(g["patient_id"], by_id[g["patient_id"]]["evidence"],
                                   emb.omics[0] if emb.has_omics[0] else None,
                                   emb.slide[0] if emb.has_slide[0] else None)], max_new_tokens=160)[0]
        assert out.text == g["generated"]
        assert out.parsed == parse_prediction(out.text) and (out.risk is None) == (not g["parsed"])
