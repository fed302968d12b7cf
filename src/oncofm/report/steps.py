"""The inference steps of ``oncofm explain``, one function per step.

Each step takes the previous steps' results and returns its own, or raises :class:`StepSkipped` when
its input modality or its model is absent (a note in the report, never an invented number), or
:class:`~oncofm.errors.OncoFMError` for bad user input (the whole explanation stops, nothing written).

The steps call the library functions of the stages that own them:

========================  ==========================================================================
step                      library function (stage)
========================  ==========================================================================
normalise_expression      ``oncofm.cohort.normalize.apply_normalizer`` (cohort)
build_pairs               ``oncofm.omics.features.build_pairs`` (cox + features)
run_omics_model           ``oncofm.omics.predict.load_omics_model`` + ``predict_patient`` (omics)
tile_slide                ``oncofm.pathology.reader.open_slide`` + the tiler (tiles)
run_slide_model           ``oncofm.pathology.slide_train.load_slide_model`` + ``slide_model`` (slide model)
top_patches               ``oncofm.pathology.morphometrics.patch_morphometrics`` (tiles)
build_evidence            ``oncofm.fusion.evidence`` (gene_evidence, attention_concentration) (fusion)
run_fusion                the fusion LLM's generation + prediction parser (fusion)
cohort_context            the omics model's stored training-cohort predictions (omics)
========================  ==========================================================================
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncofm.cohort.schema import Col
from oncofm.errors import OncoFMError
from oncofm.paths import RunLayout
from oncofm.report.inputs import PatientInput

log = logging.getLogger(__name__)

PAN = "__all__"


class StepSkipped(Exception):  # noqa: N818 - a note, not an error
    """A step could not run because its modality or its model is absent; the message goes in the report."""


def _optional_import(module: str, what: str) -> Any:
    """Import a stage's module, or skip the step saying which stage provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise StepSkipped(f"{what} is not available in this installation ({module}: {exc})") from None


def _optional_import_names(module: str, *names: str) -> list[Any]:
    """Import ``names`` from a stage's module, or skip the step."""
    mod = _optional_import(module, module)
    try:
        return [getattr(mod, n) for n in names]
    except AttributeError as exc:
        raise StepSkipped(f"{module} lacks {exc}") from None


# ----------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------
@dataclass
class NormalisedExpression:
    values: pd.Series  # model gene -> normalised value (NaN where the file lacks the gene)
    raw: pd.Series  # model gene -> raw value
    n_present: int
    n_model_genes: int


@dataclass
class OmicsResult:
    prob: float  # P(death within 5 years)
    embedding: np.ndarray | None  # (d,) penultimate layer
    attributions: pd.DataFrame  # gene, attribution (+ = towards death), expression_z, coef
    version: str
    source: str = "model"  # "model" (run now) or "stored" (the run's saved predictions)


@dataclass
class TiledSlide:
    path: Path
    h5: Path | None
    coords: np.ndarray  # (N, 2) level-0 x, y
    patch_side_level0: float  # patch side in level-0 pixels
    level0_size: tuple[int, int]  # (width, height)
    read_level: int
    read_size: int
    mpp: float  # level 0
    read_mpp: float  # of the patches as read (level read_level)
    thumbnail: np.ndarray  # (h, w, 3) uint8


@dataclass
class SlideResult:
    prob: float
    embedding: np.ndarray | None  # (d,)
    attention: np.ndarray  # (N,) sums to 1, aligned with TiledSlide.coords
    version: str


@dataclass
class PatchFinding:
    rank: int
    x: int
    y: int
    attention: float
    image: np.ndarray  # (S, S, 3) uint8
    morphometrics: dict[str, float]


@dataclass
class PatchSummary:
    patches: list[PatchFinding]  # the most attended, rank order
    slide_mean: dict[str, float]  # morphometrics averaged over a sample of the slide's patches


@dataclass
class FusionResult:
    text: str
    risk: float | None
    prediction: str | None  # "death within 5 years" / "alive at 5 years"
    version: str


@dataclass
class CohortContext:
    cancer_type: str
    model: str  # which model's risks are compared
    patient_risk: float
    risks: np.ndarray  # (n,) training patients of this cancer type
    times_days: np.ndarray  # (n,)
    events: np.ndarray  # (n,)
    percentile: float  # share of training patients with a lower risk


@dataclass
class StepLog:
    """Wall time and outcome of each step (for explanation.json)."""

    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def model_version(model_dir: Path) -> str:
    """A short content hash of a model directory's weights and config (files under 64 MB)."""
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in
                   {".safetensors", ".yaml", ".json", ".bin", ".pt"} and p.name != "metrics.json")
    for p in files:
        h.update(p.name.encode())
        if p.stat().st_size < 64 * 2**20:
            h.update(p.read_bytes())
        else:
            h.update(str(p.stat().st_size).encode())
    return f"{model_dir.name}@{h.hexdigest()[:12]}" if files else f"{model_dir.name}@unversioned"


def model_genes(layout: RunLayout) -> list[str]:
    """The genes the omics model uses (its ``config.yaml``), else ``features/genes.txt``, else every gene
    with normalisation statistics."""
    import yaml

    config = layout.model_dir("omics") / "config.yaml"
    if config.exists():
        genes = (yaml.safe_load(config.read_text()) or {}).get("genes")
        if genes:
            return [str(g) for g in genes]
    genes_txt = layout.features_dir / "genes.txt"
    if genes_txt.exists():
        return [g for g in genes_txt.read_text().split() if g]
    stats = pd.read_parquet(layout.normalization, columns=[Col.CANCER, "gene"])
    return stats.loc[stats[Col.CANCER] == PAN, "gene"].astype(str).tolist()


# ----------------------------------------------------------------------------------------------------
# omics
# ----------------------------------------------------------------------------------------------------
def normalise_expression(patient: PatientInput, layout: RunLayout,
                         min_gene_fraction: float = 0.5) -> NormalisedExpression:
    """Normalise the patient's expression with the run's training statistics; check gene coverage."""
    if patient.expression is None:
        raise StepSkipped("no expression profile was given: the omics model was not run")
    from oncofm.cohort.normalize import apply_normalizer

    genes = model_genes(layout)
    raw = patient.expression.reindex(genes)
    n_present = int(raw.notna().sum())
    if n_present < min_gene_fraction * len(genes):
        overlap_hint = ", ".join(patient.expression.index[:3].astype(str))
        raise OncoFMError(
            f"the expression profile has {n_present} of the model's {len(genes)} genes "
            f"({100 * n_present / max(len(genes), 1):.1f}%); at least {100 * min_gene_fraction:.0f}% are needed. "
            f"Use HGNC gene symbols as in the training cohort (the file's genes look like {overlap_hint}).")
    stats = pd.read_parquet(layout.normalization)
    frame = raw.to_frame().T
    frame.index = pd.Index([patient.patient_id], name=Col.PATIENT)
    norm = apply_normalizer(frame, pd.Series({patient.patient_id: patient.cancer_type}), stats)
    return NormalisedExpression(values=norm.iloc[0], raw=raw, n_present=n_present, n_model_genes=len(genes))


def build_pairs(norm: NormalisedExpression, patient: PatientInput, layout: RunLayout) -> np.ndarray:
    """The (expression, Cox coefficient) pairs of the model genes, shape (1, G, 2)."""
    if not layout.coefficients.exists():
        raise StepSkipped(f"no Cox coefficient table in the run ({layout.coefficients}): run `oncofm cox`")
    features = _optional_import("oncofm.omics.features", "the Cox pair builder (oncofm.omics.features)")
    coefficients = pd.read_parquet(layout.coefficients)
    expr = norm.values.to_frame().T
    expr.index = pd.Index([patient.patient_id], name=Col.PATIENT)
    pairs = features.build_pairs(expr, pd.Series({patient.patient_id: patient.cancer_type}), coefficients,
                                 list(norm.values.index))
    return np.asarray(pairs, dtype=np.float32)  # (1, G, 2)


def run_omics_model(pairs: np.ndarray, norm: NormalisedExpression, patient: PatientInput,
                    layout: RunLayout) -> OmicsResult:
    """Apply the run's omics model (``oncofm.omics.predict``): probability, embedding, per-gene attributions.

    The model builds its (expression, coefficient) input from the normalised expression with the same
    ``build_pairs`` as the previous step (``pairs``, shown for the record, must agree in shape).
    """
    model_dir = layout.model_dir("omics")
    if not (model_dir / "model.safetensors").exists():
        raise StepSkipped(f"the run has no omics model ({model_dir}): run `oncofm train omics`")
    load_omics_model, predict_patient = _optional_import_names("oncofm.omics.predict", "load_omics_model",
                                                               "predict_patient")
    predictor = load_omics_model(layout.root)
    if pairs.shape[1] != len(predictor.genes):
        raise OncoFMError(f"the run's features have {pairs.shape[1]} genes but its omics model {len(predictor.genes)}; "
                          "retrain with `oncofm train omics --redo`")
    out = predict_patient(predictor, norm.values, cancer_type=patient.cancer_type, age=patient.age,
                          sex=patient.sex, normalized=True)
    attributions = _attribution_table(out.attributions.rename_axis("gene").reset_index(name="attribution"),
                                      norm, patient, layout)
    return OmicsResult(prob=float(out.prob), embedding=np.asarray(out.embedding, dtype=np.float32).ravel(),
                       attributions=attributions, version=model_version(model_dir))


def _attribution_table(attr: Any, norm: NormalisedExpression, patient: PatientInput,
                       layout: RunLayout) -> pd.DataFrame:
    """gene, attribution, expression_z, coef, q sorted by |attribution| (largest first)."""
    if isinstance(attr, pd.DataFrame):
        df = attr[["gene", "attribution"]].copy()
    else:
        df = pd.DataFrame({"gene": list(norm.values.index), "attribution": np.asarray(attr, dtype=float).ravel()})
    df["expression_z"] = norm.values.reindex(df["gene"]).to_numpy()
    coef = _coefficients_for(patient.cancer_type, layout)
    if coef is not None:
        df = df.merge(coef, on="gene", how="left")
    return df.reindex(df["attribution"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def _coefficients_for(cancer_type: str, layout: RunLayout) -> pd.DataFrame | None:
    if not layout.coefficients.exists():
        return None
    c = pd.read_parquet(layout.coefficients, columns=["gene", "cancer_type", "coef", "q"])
    own = c[c["cancer_type"] == cancer_type]
    if own.empty:
        own = c[c["cancer_type"].isin(["__pan__", PAN])]
    return own.drop(columns="cancer_type").drop_duplicates("gene")


def stored_omics_result(patient: PatientInput, layout: RunLayout,
                        norm: NormalisedExpression | None = None) -> OmicsResult:
    """A cohort patient's omics prediction and attributions as the run's omics stage saved them.

    Used only when the model cannot be applied in this installation but the run holds the outputs of
    that same model for this patient (real numbers, labelled as stored in the report).
    """
    model_dir = layout.model_dir("omics")
    pred_file, attr_file = model_dir / "predictions.parquet", model_dir / "attributions.parquet"
    if patient.source != "cohort" or not pred_file.exists():
        raise StepSkipped("the omics model could not be applied and the run holds no stored prediction")
    preds = pd.read_parquet(pred_file).set_index(Col.PATIENT)
    if patient.patient_id not in preds.index:
        raise StepSkipped(f"the run's omics predictions do not include {patient.patient_id}")
    attr = pd.DataFrame(columns=["gene", "attribution"])
    if attr_file.exists():
        a = pd.read_parquet(attr_file)
        attr = a[a[Col.PATIENT] == patient.patient_id][["gene", "attribution"]]
    emb = None
    emb_file = model_dir / "embeddings.parquet"
    if emb_file.exists():
        e = pd.read_parquet(emb_file)
        if patient.patient_id in e.index:
            emb = e.loc[patient.patient_id].to_numpy(dtype=np.float32)
    df = attr.reindex(attr["attribution"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    if norm is not None:
        df["expression_z"] = norm.values.reindex(df["gene"]).to_numpy()
    coef = _coefficients_for(patient.cancer_type, layout)
    if coef is not None:
        df = df.merge(coef, on="gene", how="left")
    return OmicsResult(prob=float(preds.loc[patient.patient_id, "prob"]), embedding=emb, attributions=df,
                       version=model_version(model_dir), source="stored")


# ----------------------------------------------------------------------------------------------------
# slide
# ----------------------------------------------------------------------------------------------------
def tile_slide(patient: PatientInput, layout: RunLayout, workdir: Path, *, target_mpp: float = 0.5,
               patch_size: int = 224, min_tissue: float = 0.5, thumb_size: int = 1024) -> TiledSlide:
    """Open the slide (mpp from the file or ``--mpp``), find tissue and lay the patch grid.

    A cohort patient's slide already tiled in the run (``tiles/<stem>.h5`` with the same settings) is
    reused. Raises OncoFMError for an unreadable slide, a slide without mpp (and no ``--mpp``) and a
    slide without tissue.
    """
    if patient.slide is None:
        raise StepSkipped("no slide was given: the slide model was not run")
    reader = _optional_import("oncofm.pathology.reader", "the slide reader (oncofm.pathology.reader)")
    tiling = _optional_import("oncofm.pathology.tiling", "the tiler (oncofm.pathology.tiling)")
    try:
        with reader.open_slide(patient.slide, mpp=patient.mpp) as slide:
            thumbnail = np.asarray(slide.thumbnail(thumb_size))[..., :3]
            mpp = float(slide.mpp)
        h5 = _existing_tiles(patient, layout, target_mpp, patch_size)
        if h5 is None:
            settings = tiling.TilingSettings(source=str(patient.slide), out=str(workdir / "tiles"),
                                             target_mpp=target_mpp, patch_size=patch_size, min_tissue=min_tissue,
                                             slide_mpp=patient.mpp, qc=False)
            h5 = Path(tiling.tile_slide(patient.slide, settings).paths["h5"])
    except tiling.EmptySlideError as exc:
        raise OncoFMError(f"no tissue found in {patient.slide.name}: {exc}. Give an H&E slide with tissue.") from None
    except OncoFMError as exc:
        raise OncoFMError(str(exc).replace(reader.MPP_FLAG, "--mpp")) from None
    return read_tiles(h5, patient.slide, thumbnail, mpp)


def _existing_tiles(patient: PatientInput, layout: RunLayout, target_mpp: float, patch_size: int) -> Path | None:
    """The run's own tiles of this slide, when they were made with the same target mpp and patch size."""
    import h5py

    from oncofm.pathology.reader import slide_stem

    h5 = layout.tiles_dir / f"{slide_stem(patient.slide)}.h5"
    if patient.source != "cohort" or not h5.exists():
        return None
    with h5py.File(h5, "r") as f:
        same = (abs(float(f.attrs["target_mpp"]) - target_mpp) < 1e-9 and int(f.attrs["patch_size"]) == patch_size
                and Path(str(f.attrs["slide_path"])).resolve() == patient.slide.resolve())
    return h5 if same else None


def read_tiles(h5: Path, slide_path: Path, thumbnail: np.ndarray, mpp: float) -> TiledSlide:
    """A :class:`TiledSlide` from a tiles HDF5 file (CONTRACTS.md, tiles)."""
    import h5py

    with h5py.File(h5, "r") as f:
        coords = np.asarray(f["coords"], dtype=np.int64)  # (N, 2)
        a = dict(f.attrs)
    if len(coords) == 0:
        raise OncoFMError(f"no tissue found in {slide_path.name}: the slide has no patch with enough tissue. "
                          "Give an H&E slide with tissue.")
    return TiledSlide(path=slide_path, h5=h5, coords=coords, patch_side_level0=float(a["level0_size"]),
                      level0_size=(int(a["width"]), int(a["height"])), read_level=int(a["read_level"]),
                      read_size=int(a["read_size"]), mpp=mpp, read_mpp=mpp * float(a.get("downsample", 1.0)),
                      thumbnail=thumbnail)


def run_slide_model(tiled: TiledSlide, layout: RunLayout) -> SlideResult:
    """Apply the run's slide model (``oncofm.pathology.slide_train``) to every patch of the slide.

    Encodes the patches with the model's own encoder (features cached in a temporary file, never in the
    run), then the attention-MIL aggregator gives the probability, the slide embedding and the attention.
    """
    import tempfile

    model_dir = layout.model_dir("slide")
    if not (model_dir / "model.safetensors").exists():
        raise StepSkipped(f"the run has no slide model ({model_dir}): run `oncofm train slide`")
    load_slide_model, = _optional_import_names("oncofm.pathology.slide_train", "load_slide_model")
    extract, load, bag_ds, predict = _optional_import_names(
        "oncofm.pathology.slide_model", "extract_features", "load_features", "FeatureBagDataset", "predict_bags")
    model, st = load_slide_model(layout.root)
    encoder = model.encoder
    with tempfile.TemporaryDirectory(prefix="oncofm-slide-") as tmp:
        h5 = extract(encoder, tiled.h5, Path(tmp) / "features.h5", batch_size=st.feature_batch,
                     slide_mpp=tiled.mpp, encoder_name=st.encoder)
        feats, coords = load(h5)  # (N, D), (N, 2)
    model.encoder = None  # the aggregator + head over the features of every patch
    try:
        out = predict(model, bag_ds([feats], [0.0]))[0]
    finally:
        model.encoder = encoder
    if not np.array_equal(coords, tiled.coords):
        raise OncoFMError("the slide model's features do not line up with the slide's patches")
    attention = np.asarray(out["attention"], dtype=np.float64).ravel()  # (N,)
    return SlideResult(prob=float(out["prob"]), embedding=np.asarray(out["embedding"], dtype=np.float32).ravel(),
                       attention=attention / attention.sum(), version=model_version(model_dir))


def top_patches(tiled: TiledSlide, slide: SlideResult, k: int = 8, sample: int = 32, seed: int = 0
                ) -> PatchSummary:
    """The ``k`` most attended patches (pixels at the read level, morphometrics) and the slide's average
    morphometrics over a random sample of ``sample`` patches (the reference for "more than average")."""
    reader = _optional_import("oncofm.pathology.reader", "the slide reader")
    morpho = _optional_import("oncofm.pathology.morphometrics", "patch morphometrics")
    order = np.argsort(-slide.attention)[:k]
    rng = np.random.default_rng(seed)
    ref_idx = rng.choice(len(tiled.coords), size=min(sample, len(tiled.coords)), replace=False)
    size = (tiled.read_size, tiled.read_size)
    with reader.open_slide(tiled.path, mpp=tiled.mpp) as handle:
        def read(i: int) -> np.ndarray:
            x, y = (int(v) for v in tiled.coords[i])
            return np.asarray(handle.read_region((x, y), tiled.read_level, size))[..., :3]

        patches = []
        for rank, i in enumerate(order, start=1):
            rgb = read(int(i))
            m = {key: float(v) for key, v in morpho.patch_morphometrics(rgb, mpp=tiled.read_mpp).items()}
            patches.append(PatchFinding(rank=rank, x=int(tiled.coords[i][0]), y=int(tiled.coords[i][1]),
                                        attention=float(slide.attention[i]), image=rgb, morphometrics=m))
        ref = pd.DataFrame([morpho.patch_morphometrics(read(int(i)), mpp=tiled.read_mpp) for i in ref_idx])
    return PatchSummary(patches=patches, slide_mean={c: float(ref[c].mean()) for c in ref.columns})


# ----------------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------------
def build_evidence(patient: PatientInput, omics: OmicsResult | None, slide: SlideResult | None,
                   summary: PatchSummary | None, n_genes: int = 3) -> dict[str, Any]:
    """The patient's evidence record in the reasoning stage's format (``oncofm.fusion.evidence``).

    Keys: ``cancer_type, age, omics_prob, risk_genes, protective_genes, slide_prob, image, missing``; genes as ``{gene, z, cox, q, attribution}``; image as ``{n_patches, top_fraction,
    top_share, findings: [{feature, name, top, slide, ratio}]}``.
    """
    ev_mod = _optional_import("oncofm.fusion.evidence", "the evidence record (oncofm.fusion.evidence)")
    # the same keys, in the same order, as the reasoning stage's records (oncofm.fusion.reasoning)
    ev: dict[str, Any] = {"cancer_type": patient.cancer_type, "age": patient.age, "omics_prob": None,
                          "risk_genes": [], "protective_genes": [], "slide_prob": None, "image": None,
                          "missing": []}
    if omics is None:
        ev["missing"].append("omics")
    else:
        ev["omics_prob"] = round(omics.prob, 2)
        z = omics.attributions.set_index("gene")["expression_z"] if "expression_z" in omics.attributions else {}
        cox = {}
        if "coef" in omics.attributions:
            cox = {(patient.cancer_type, g): (float(c), float(q) if pd.notna(q) else float("nan"))
                   for g, c, q in zip(omics.attributions["gene"], omics.attributions["coef"],
                                      omics.attributions.get("q", pd.Series(np.nan, index=omics.attributions.index)),
                                      strict=True) if pd.notna(c)}
        ev["risk_genes"], ev["protective_genes"] = ev_mod.gene_evidence(
            omics.attributions[["gene", "attribution"]], pd.Series(z), patient.cancer_type, cox, n_genes)
    if slide is None:
        ev["missing"].append("slide")
    else:
        ev["slide_prob"] = round(slide.prob, 2)
        ev["image"] = {"n_patches": int(len(slide.attention)), "top_fraction": 0.1,
                       "top_share": round(ev_mod.attention_concentration(slide.attention, 0.1), 2),
                       "findings": _findings(summary, ev_mod.MORPH_FEATURES)}
    return ev


def _findings(summary: PatchSummary | None, names: dict[str, str]) -> list[dict[str, Any]]:
    if summary is None or not summary.patches:
        return []
    top = {k: float(np.mean([p.morphometrics[k] for p in summary.patches])) for k in summary.patches[0].morphometrics}
    out = []
    for key, name in names.items():
        ref = summary.slide_mean.get(key)
        if key in top and ref is not None and ref > 1e-9:
            out.append({"feature": key, "name": name, "top": round(top[key], 3), "slide": round(ref, 3),
                        "ratio": round(top[key] / ref, 2)})
    return out


def run_fusion(evidence: dict[str, Any], omics: OmicsResult | None, slide: SlideResult | None,
               layout: RunLayout) -> FusionResult:
    """Generate the explanation with the run's fusion LLM (``oncofm.fusion``) and parse its prediction line.

    The missing modality is passed as zeros with ``has_* = False`` (the fusion model's learned stand-in).
    """
    model_dir = layout.model_dir("fusion")
    if not (model_dir / "projector.safetensors").exists():
        raise StepSkipped(f"the run has no fusion model ({model_dir}): run `oncofm train fusion`; "
                          "no generated explanation")
    product_model, = _optional_import_names("oncofm.fusion.explain", "product_model")
    encode_item, = _optional_import_names("oncofm.fusion.model", "encode_item")
    generate_texts, = _optional_import_names("oncofm.fusion.generate", "generate_texts")
    model, tokenizer, cfg = product_model(layout.root)  # fp32, LoRA merged, loaded once per process
    d_omics, d_slide = int(cfg["d_omics"]), int(cfg["d_slide"])
    om, has_om = _embedding_or_zeros(None if omics is None else omics.embedding, d_omics, "omics")
    sl, has_sl = _embedding_or_zeros(None if slide is None else slide.embedding, d_slide, "slide")
    item = encode_item(tokenizer, {"patient_id": "patient", "evidence": evidence}, om, sl, has_om, has_sl,
                       with_target=False)
    text = generate_texts(model, tokenizer, [item], batch_size=1, progress=False)[0]
    prediction, risk = parse_prediction(text)
    return FusionResult(text=text, risk=risk, prediction=prediction, version=model_version(model_dir))


def _embedding_or_zeros(emb: np.ndarray | None, dim: int, name: str) -> tuple[np.ndarray, bool]:
    """The embedding as the fusion model takes it, and whether it is present (zeros + False when absent)."""
    if emb is None or dim == 0:
        return np.zeros(dim, dtype=np.float32), False
    emb = np.asarray(emb, dtype=np.float32).ravel()
    if emb.shape[0] != dim:
        raise StepSkipped(f"the {name} embedding has {emb.shape[0]} values but the fusion model was trained on "
                          f"{dim}: the run's models are out of step; retrain with `oncofm train fusion --redo`")
    return emb, True


def parse_prediction(text: str) -> tuple[str | None, float | None]:
    """The fixed prediction line (``oncofm.fusion.parse``) → (outcome words, risk), or (None, None)."""
    from oncofm.fusion.parse import parse_prediction as parse

    parsed = parse(text)
    if parsed is None:
        return None, None
    return ("death within 5 years" if parsed.death else "alive at 5 years"), parsed.risk


# ----------------------------------------------------------------------------------------------------
# cohort context
# ----------------------------------------------------------------------------------------------------
def cohort_context(patient: PatientInput, omics: OmicsResult | None, slide: SlideResult | None,
                   layout: RunLayout) -> CohortContext:
    """Where the patient's risk falls among the training patients of the same cancer type.

    Compares like with like: the omics model's probability against the omics model's stored
    predictions of the training split (or the slide model's, when only a slide was given).
    """
    choice = [("omics", omics), ("slide", slide)]
    for name, result in choice:
        if result is None:
            continue
        pred_file = layout.model_dir(name) / "predictions.parquet"
        if not pred_file.exists():
            continue
        preds = pd.read_parquet(pred_file)
        if "split" not in preds.columns:
            continue
        patients = pd.read_parquet(layout.patients)
        train = preds[preds["split"] == "train"].merge(patients, on=Col.PATIENT)
        train = train[train[Col.CANCER] == patient.cancer_type]
        train = train[train[Col.PATIENT] != patient.patient_id]
        if len(train) < 5:
            continue
        risks = train["prob"].to_numpy(float)
        return CohortContext(cancer_type=patient.cancer_type, model=name, patient_risk=result.prob, risks=risks,
                             times_days=train[Col.OS_DAYS].to_numpy(float),
                             events=train[Col.OS_EVENT].to_numpy(int),
                             percentile=float((risks < result.prob).mean()))
    raise StepSkipped("no stored training-cohort predictions of the omics or slide model for "
                      f"{patient.cancer_type}: the cohort comparison is left out")
