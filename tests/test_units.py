"""The units check (`oncofm.cohort.units`) on the real tcga13 cohort, and the one policy for cancer types
unseen in training (`oncofm.explain.inputs`, the web app).

No real RSEM values are in ../shared/data (tcga13 holds cBioPortal per-cohort z-scores only), so the
wrong-unit inputs are built from real patients: a log2(RSEM+1)-like profile keeps each patient's real
z-score pattern (clipped to ±4) and gives every gene a location drawn from N(8.5, 2.5) clipped to
0.5–15 and a spread drawn log-normally around 1.2 — the range of log2 RSEM of expressed genes —
clipped to 0–20; a counts-like profile is round(2^x − 1) of it.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from oncofm.cohort.units import check_profiles, check_units, describe_units, require_units, training_units
from oncofm.errors import OncoFMError


def log2_rsem_like(z: pd.DataFrame, seed: int = 0, median: float = 8.5, spread: float = 1.2) -> pd.DataFrame:
    """A log2(RSEM+1)-like matrix with the real patients' pattern (see the module docstring)."""
    rng = np.random.default_rng(seed)
    mu = np.clip(rng.normal(median, 2.5 * median / 8.5, z.shape[1]), 0.1, 15)
    sd = np.exp(rng.normal(np.log(spread), 0.4, z.shape[1]))
    values = np.clip(mu + sd * np.clip(z.to_numpy(float), -4, 4), 0, 20)
    return pd.DataFrame(values, index=z.index, columns=z.columns)


def counts_like(z: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    return np.round(2 ** log2_rsem_like(z, seed) - 1)


@pytest.fixture(scope="module")
def real(tcga13_run):  # noqa: ANN001, ANN201
    """Every tcga13 patient of a cancer type with training statistics: z-scores, types, statistics."""
    stats = pd.read_parquet(tcga13_run / "cohort" / "normalization.parquet")
    expr = pd.read_parquet(tcga13_run / "cohort" / "expression.parquet")
    types = pd.read_parquet(tcga13_run / "cohort" / "patients.parquet").set_index("patient_id")["cancer_type"]
    types = types.reindex(expr.index).astype(str)
    keep = types.isin(set(stats["cancer_type"])).to_numpy()
    return expr[keep], types[keep], stats


def test_describe_units_rules() -> None:
    rng = np.random.default_rng(0)
    assert describe_units(rng.poisson(300, 2000)) == "counts"
    assert describe_units(np.log2(rng.poisson(300, 2000) + 1)) == "log-scale"
    assert describe_units(rng.normal(0, 1, 2000)) == "z-scores"
    assert describe_units(rng.normal(0, 30, 2000)) == "other"  # centred, but a spread of 30
    assert describe_units([np.nan, np.inf]) == "other"


def test_every_real_tcga13_patient_passes(real) -> None:  # noqa: ANN001
    expr, types, stats = real
    assert len(expr) == 4191 and training_units(stats) == "z-scores"
    reports = check_profiles(expr, stats, types, what="the expression profile")
    assert all(r.ok and r.checked for r in reports)
    assert {r.units for r in reports} == {"z-scores"}
    med = np.array([r.median_abs_z for r in reports])
    beyond = np.array([r.share_beyond_clip for r in reports])
    assert 0.5 < med.mean() < 0.8 and med.max() < 1.5  # measured: mean 0.64, max 1.35
    assert beyond.max() < 0.3  # measured: max 0.245
    # the same real z-scores as a cohort (every patient of one type, or all): centred, spread ~1
    kirc = check_units(expr[types.to_numpy() == "KIRC"], stats, types, what="KIRC")
    whole = check_units(expr, stats, types, what="tcga13")
    for rep in (kirc, whole):
        assert rep.ok and rep.mode == "cohort" and rep.gene_location < 0.2 and 0.8 < rep.gene_spread < 1.2


def test_log_scale_and_counts_profiles_are_refused(real) -> None:  # noqa: ANN001
    expr, types, stats = real
    for name, values, shown in (("log-scale", log2_rsem_like(expr), "looks like log-scale values"),
                                ("counts", counts_like(expr), "looks like counts")):
        reports = check_profiles(values, stats, types, what="the expression profile")
        assert not any(r.ok for r in reports), name
        assert {r.units for r in reports} == {name}
        assert min(r.median_abs_z for r in reports) > 10  # measured: log-scale >= 11.1, counts >= 391
        pid = types.index[types == "KIRC"][0]
        with pytest.raises(OncoFMError) as err:
            require_units(values.loc[pid], stats, "KIRC", what="the expression profile")
        msg = str(err.value)
        assert msg.startswith(f"the expression profile {shown}")
        assert "against the KIRC training statistics" in msg
        assert "trained on per-cohort RNA-seq z-scores" in msg and "z-score each gene within its cohort" in msg
        cohort = check_units(values, stats, types, what="the cohort X")
        assert not cohort.ok and cohort.gene_location > 10 and cohort.units == name
        assert cohort.message.startswith(f"the cohort X {shown}")


def test_lowly_expressed_log_profile_is_refused_by_its_shape(real) -> None:  # noqa: ANN001
    """log2 values with a median near 1.5 lie within 3 training scales of the z-score centres: the
    log-scale shape (non-negative, median >= 1) refuses them."""
    expr, types, stats = real
    low = log2_rsem_like(expr.iloc[:300], median=1.5, spread=0.8)
    reports = check_profiles(low, stats, types.iloc[:300], what="the expression profile")
    assert any(r.median_abs_z < 3 for r in reports)
    assert not any(r.ok for r in reports)


def test_a_log_scale_model_refuses_z_scores(real) -> None:  # noqa: ANN001
    """Statistics fitted on a log2 cohort (a Firehose import): log2 profiles pass, z-scores are refused."""
    from oncofm.cohort.normalize import fit_normalizer

    expr, types, _ = real
    logged = log2_rsem_like(expr)
    patients = types.rename("cancer_type").rename_axis("patient_id").reset_index()
    stats = fit_normalizer(logged, patients, logged.index[::2])
    assert training_units(stats) == "log-scale"
    held_out = logged.index[1::2]
    assert all(r.ok for r in check_profiles(logged.loc[held_out], stats, types, what="p"))
    with pytest.raises(OncoFMError, match=r"looks like z-scores .* trained on log-scale values"):
        require_units(expr.loc[held_out[0]], stats, types[held_out[0]], what="the expression profile")


def test_too_few_genes_are_not_checked(real) -> None:  # noqa: ANN001
    expr, types, stats = real
    rep = check_units(log2_rsem_like(expr).iloc[0, :5], stats, types.iloc[0], what="p")
    assert rep.ok and not rep.checked and rep.n_genes == 5


# ---------------------------------------------------------------- cancer types unseen in training

def _profile_file(tmp_path, expr: pd.DataFrame):  # noqa: ANN001, ANN202
    f = tmp_path / "patient.csv"
    expr.iloc[0].rename("value").rename_axis("gene").reset_index().to_csv(f, index=False)
    return f


def test_unseen_cancer_type_is_accepted_with_a_note(tcga13_run, real, tmp_path) -> None:  # noqa: ANN001
    from oncofm.explain.inputs import resolve_patient
    from oncofm.paths import RunLayout

    layout = RunLayout(tcga13_run)
    f = _profile_file(tmp_path, real[0])
    kw = {"patient_id": None, "expression": f, "slide": None, "mpp": None}
    seen = resolve_patient(layout, cancer_type="tcga-luad", **kw)
    assert seen.cancer_type == "LUAD" and seen.notes == []
    for given, code in (("OV", "OV"), ("tcga-ucec", "UCEC"), ("XYZ", "XYZ")):
        patient = resolve_patient(layout, cancer_type=given, **kw)
        assert patient.cancer_type == code and len(patient.notes) == 1
        note = patient.notes[0]
        assert note.startswith(f"cancer type {code} was not seen in training")
        assert "pan-cancer normalisation statistics and Cox coefficients" in note and "less reliable" in note
    typo = resolve_patient(layout, cancer_type="KIRCC", **kw)
    assert "did you mean KIRC?" in typo.notes[0]
    for bad in ("kidney cancer", "??", "K", "1234", "<script>"):
        with pytest.raises(OncoFMError, match=r"is not a cancer type code.*trained on BLCA, BRCA"):
            resolve_patient(layout, cancer_type=bad, **kw)
    with pytest.raises(OncoFMError, match=r"--cancer-type is required"):
        resolve_patient(layout, cancer_type="", **kw)


def test_web_app_follows_the_same_policy(tmp_path) -> None:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from oncofm.web.app import WebSettings, create_app
    from test_report_doubles import demo_run, double_predictors

    run = demo_run()
    expr = pd.read_parquet(run / "cohort" / "expression.parquet")
    csv = expr.iloc[0].rename("value").rename_axis("gene").reset_index().to_csv(index=False).encode()
    settings = WebSettings(run=str(run), jobs_dir=str(tmp_path / "jobs"), workers=1)
    with TestClient(create_app(settings, predictors=double_predictors(omics=True))) as client:
        bad = client.post("/api/explain", files={"expression": ("p.csv", csv, "text/csv")},
                          data={"cancer_type": "kidney cancer"})
        assert bad.status_code == 400 and "is not a cancer type code" in bad.json()["detail"]
        ok = client.post("/api/explain", files={"expression": ("p.csv", csv, "text/csv")},
                         data={"cancer_type": "LUAD"})  # unseen by the demo run: pan-cancer, with a note
        assert ok.status_code == 202
        job = ok.json()
        for _ in range(300):
            job = client.get(f"/api/jobs/{job['id']}").json()
            if job["status"] in ("done", "failed"):
                break
            time.sleep(0.2)
        assert job["status"] == "done", job
