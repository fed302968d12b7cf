"""The omics transformer: contract, losses, and learning a planted signal (synthetic cohort, known answer)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from oncofm.omics.attributions import integrated_gradients
from oncofm.omics.model import OmicsTransformer, create_model, model_inputs
from oncofm.omics.train import cox_partial_likelihood


def _batch(b: int = 5, g: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"pairs": torch.randn(b, g, 2, generator=gen), "cancer": torch.tensor([0, 1, 2, 1, 0])[:b],
            "age": torch.tensor([0.1, float("nan"), -1.0, 2.0, 0.0])[:b], "sex": torch.tensor([0, 1, 2, 2, 1])[:b]}


def test_forward_shapes_and_validation() -> None:
    model = create_model(n_genes=7, n_cancer_types=3, d_model=16, n_layers=1, n_heads=2).eval()
    logits, emb = model(*model_inputs(_batch()))
    assert logits.shape == (5,) and emb.shape == (5, 16)
    assert torch.isfinite(logits).all()  # NaN age handled by its own token
    with pytest.raises(ValueError, match="n_heads"):
        OmicsTransformer(n_genes=7, n_cancer_types=3, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="n_genes"):
        OmicsTransformer(n_genes=0, n_cancer_types=3)
    with pytest.raises(ValueError, match="unknown omics model"):
        create_model("nope", n_genes=3, n_cancer_types=2)
    with pytest.raises(ValueError, match="pairs must be"):
        model(torch.zeros(2, 6, 2), *model_inputs(_batch(2))[1:])
    with pytest.raises(TypeError):
        OmicsTransformer(7, 3)  # keyword-only


def test_reset_parameters_reinitialises() -> None:
    torch.manual_seed(0)
    model = OmicsTransformer(n_genes=4, n_cancer_types=2, d_model=8, n_layers=1, n_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_parameters()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "genes.identity" in changed and "head.weight" in changed and "cancer.weight" in changed


def test_cox_loss_matches_lifelines_breslow_loglik() -> None:
    """The batch Cox loss equals the negative Breslow partial log-likelihood / events (no ties)."""
    rng = np.random.default_rng(1)
    n = 40
    x = rng.normal(size=n)
    t = rng.exponential(np.exp(-0.7 * x)) + np.arange(n) * 1e-6  # distinct times
    e = (rng.random(n) < 0.7).astype(float)
    beta = 0.4
    risk = beta * x
    ours = float(cox_partial_likelihood(torch.tensor(risk), torch.tensor(t), torch.tensor(e)))
    ref = 0.0
    for i in np.nonzero(e)[0]:
        ref += risk[i] - np.log(np.exp(risk[t >= t[i]]).sum())
    assert ours == pytest.approx(-ref / e.sum(), rel=1e-10)
    assert float(cox_partial_likelihood(torch.tensor(risk), torch.tensor(t), torch.zeros(n))) == 0.0


def test_integrated_gradients_completeness() -> None:
    torch.manual_seed(0)
    model = OmicsTransformer(n_genes=7, n_cancer_types=3, d_model=16, n_layers=1, n_heads=2, dropout=0.0,
                             attention_dropout=0.0).eval()
    batch = _batch()
    attr = integrated_gradients(model, batch, steps=64)  # (B, G)
    zero = dict(batch, pairs=batch["pairs"].clone())
    zero["pairs"][..., 0] = 0
    with torch.no_grad():
        diff = model(*model_inputs(batch))[0] - model(*model_inputs(zero))[0]
    assert attr.shape == (5, 7)
    torch.testing.assert_close(attr.sum(1), diff, atol=2e-3, rtol=2e-2)


# ------------------------------------------------------------------ planted signal, through the whole stage
PLANTED = {"GENE_00": 1.2, "GENE_01": -1.0, "GENE_02": 0.9}


def make_synthetic_run(root, n: int = 900, g: int = 16, seed: int = 0):  # noqa: ANN001, ANN201
    """A run directory with cohort/ and features/ whose survival depends on three planted genes only."""
    from oncofm.io import write_parquet

    rng = np.random.default_rng(seed)
    genes = [f"GENE_{i:02d}" for i in range(g)]
    types = np.array(["AAA", "BBB", "CCC"])[rng.integers(0, 3, n)]
    x = rng.normal(size=(n, g)).astype(np.float32)
    lp = sum(b * x[:, genes.index(k)] for k, b in PLANTED.items())
    t_event = rng.exponential(1500 * np.exp(-lp))  # days; roughly half die by 5 years
    t_cens = rng.uniform(300, 4000, n)
    time = np.minimum(t_event, t_cens)
    event = (t_event <= t_cens).astype(int)
    ids = [f"TCGA-SY-{i:04d}" for i in range(n)]
    patients = pd.DataFrame({"patient_id": ids, "cancer_type": types, "age": rng.normal(60, 10, n),
                             "sex": rng.choice(["female", "male"], n), "os_days": time, "os_event": event})
    split = np.where(np.arange(n) % 10 < 6, "train", np.where(np.arange(n) % 10 < 8, "val", "test"))
    coef = np.array([PLANTED.get(gn, 0.0) for gn in genes], dtype=np.float32) + rng.normal(0, 0.05, g)
    pairs = np.stack([x, np.broadcast_to(coef, x.shape)], -1).astype(np.float32)  # (N, G, 2)
    write_parquet(patients, root / "cohort" / "patients.parquet")
    write_parquet(pd.DataFrame({"patient_id": ids, "split": split}), root / "cohort" / "splits.parquet")
    (root / "features").mkdir(parents=True)
    np.save(root / "features" / "pairs.npy", pairs)
    (root / "features" / "genes.txt").write_text("\n".join(genes) + "\n")
    (root / "features" / "patients.txt").write_text("\n".join(ids) + "\n")
    write_parquet(pd.DataFrame({"gene": genes}), root / "features" / "selection.parquet")  # as `oncofm features`
    return root


def test_learns_planted_signal_and_attributions_find_it(tmp_path) -> None:
    from oncofm.omics.artifacts import OmicsArtifacts
    from oncofm.omics.train import MODEL_LABEL, OmicsTrainSettings, train_omics

    run = make_synthetic_run(tmp_path / "run")
    settings = OmicsTrainSettings(run=str(run), d_model=16, n_layers=1, n_heads=2, epochs=10, patience=10,
                                  batch_size=64, lr=3e-3, baselines=["clinical"], n_boot=50, ig_steps=8, threads=1,
                                  progress=False, anchor="none")  # the transformer itself must learn it
    train_omics(settings)
    arts = OmicsArtifacts.of(run)
    import json

    metrics = json.loads(arts.metrics.read_text())
    auc = metrics["test"][MODEL_LABEL]["pooled"]["auc"]
    clinical = metrics["test"]["clinical"]["pooled"]["auc"]
    assert auc > 0.75, metrics["comparison"]  # truth-model AUC here is about 0.8
    assert clinical < 0.65  # clinical covariates carry no signal in this cohort
    attr = pd.read_parquet(arts.attributions)
    top = attr.assign(a=attr["attribution"].abs()).groupby("gene")["a"].mean().nlargest(3)
    assert set(top.index) == set(PLANTED)
    # signs: a patient with high GENE_00 expression gets a positive (towards death) GENE_00 attribution
    pairs = np.load(run / "features" / "pairs.npy")
    g0 = attr[attr["gene"] == "GENE_00"]["attribution"].to_numpy()
    assert np.corrcoef(g0, pairs[:, 0, 0])[0, 1] > 0.8
    g1 = attr[attr["gene"] == "GENE_01"]["attribution"].to_numpy()
    assert np.corrcoef(g1, pairs[:, 1, 0])[0, 1] < -0.8
    emb = pd.read_parquet(arts.embeddings)
    assert emb.shape == (900, 16) and list(emb.columns[:2]) == ["e0", "e1"]
    pred = pd.read_parquet(arts.predictions)
    assert list(pred.columns) == ["patient_id", "split", "prob", "risk"] and len(pred) == 900
    assert arts.roc_png.stat().st_size > 0 and arts.calibration_png.stat().st_size > 0
    # a second call with the same settings skips the work
    mtime = arts.weights.stat().st_mtime_ns
    train_omics(settings)
    assert arts.weights.stat().st_mtime_ns == mtime


def test_linear_anchor_reproduces_the_linear_model_and_token_dropout_is_train_only() -> None:
    g, n_ct = 7, 3
    model = OmicsTransformer(n_genes=g, n_cancer_types=n_ct, d_model=16, n_layers=1, n_heads=2, linear_skip=True,
                             gene_dropout=0.5)
    rng = np.random.default_rng(0)
    w, wc, wa, b = rng.normal(size=2 * g), np.array([0.0, 0.7, -0.4]), np.array([0.3, -1.0]), 0.25
    model.set_linear_anchor(w, wc, wa, b, freeze=True)
    batch = _batch(5, g)
    logits, emb = model.eval()(*model_inputs(batch))
    # the embedding carries the wide logit as its last column, so the model's logit is linear in it
    assert emb.shape == (5, 17)
    torch.testing.assert_close(emb[:, -1], logits)  # head zeroed: the logit is the wide logit
    x, c = batch["pairs"][..., 0].numpy(), batch["pairs"][..., 1].numpy()
    age = batch["age"].numpy()
    expected = (np.concatenate([x, x * c], 1) @ w + wc[batch["cancer"].numpy()] + np.nan_to_num(age) * wa[0]
                + np.isnan(age) * wa[1] + b)
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-5, atol=1e-5)  # head zeroed
    assert not any(p.requires_grad for p in model.skip.parameters())
    assert model.head.weight.requires_grad
    # token dropout: stochastic in training, deterministic in eval
    model.head.weight.data.normal_()
    torch.manual_seed(0)
    a, _ = model.train()(*model_inputs(batch))
    b2, _ = model(*model_inputs(batch))
    assert not torch.allclose(a, b2)
    e1, _ = model.eval()(*model_inputs(batch))
    e2, _ = model(*model_inputs(batch))
    assert torch.equal(e1, e2)
    with pytest.raises(ValueError, match="linear_skip"):
        OmicsTransformer(n_genes=g, n_cancer_types=n_ct, d_model=16, n_heads=2).set_linear_anchor(w, wc, wa, b)


@pytest.mark.parametrize("kind", ["logistic", "coxnet"])
def test_anchored_model_starts_as_the_fitted_linear_model(tmp_path, kind) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from oncofm.omics.baselines import anchor_linear, gene_design
    from oncofm.omics.data import ClinicalEncoder, OmicsDataset, load_omics_table
    from oncofm.omics.predict import forward_batches

    run = make_synthetic_run(tmp_path / "run", n=300, g=6)
    table = load_omics_table(run)
    train, val = table.where_split("train"), table.where_split("val")
    enc = ClinicalEncoder.fit(train)
    a = anchor_linear(train, val, enc, kind)
    assert a["chosen"].startswith(kind)
    model = OmicsTransformer(n_genes=6, n_cancer_types=len(enc.cancer_types), d_model=8, n_layers=1, n_heads=2,
                             linear_skip=True)
    model.set_linear_anchor(**{k: v for k, v in a.items() if k != "chosen"})
    logits, _ = forward_batches(model, OmicsDataset(val, enc))
    # reference: the same linear model fitted directly on the standardised design
    design = np.concatenate([gene_design(train), enc.design(train)[:, :len(enc.cancer_types) + 1]], 1)
    val_design = np.concatenate([gene_design(val), enc.design(val)[:, :len(enc.cancer_types) + 1]], 1)
    scaler = StandardScaler().fit(design)
    has = ~np.isnan(train.label)
    if kind == "logistic":
        c = float(a["chosen"].split("=")[1])
        ref = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(design[has]), train.label[has].astype(int))
        np.testing.assert_allclose(logits, ref.decision_function(scaler.transform(val_design)), atol=1e-3)
    else:  # the Platt-scaled Cox linear predictor: an increasing affine map of the Cox elastic net's risk
        import warnings

        from sksurv.linear_model import CoxnetSurvivalAnalysis
        from sksurv.util import Surv

        from oncofm.survival.endpoints import censor_at_horizon

        alpha = float(a["chosen"].split("=")[1])
        t, e = censor_at_horizon(train.time, train.event, 5.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cox = CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=[alpha], max_iter=2000).fit(
                scaler.transform(design), Surv.from_arrays(event=e.astype(bool), time=t))
        risk = cox.predict(scaler.transform(val_design))
        assert np.corrcoef(logits, risk)[0, 1] > 0.99
    # the anchor alone separates the planted signal
    from oncofm.survival.metrics import auc_score

    has_v = ~np.isnan(val.label)
    assert auc_score(val.label[has_v], logits[has_v]) > 0.7
