"""The self-contained HTML report: one file, images as base64 data URIs, inline CSS and JS, no external assets."""

from __future__ import annotations

import base64
import html
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from oncofm.report import plots

if TYPE_CHECKING:
    from oncofm.explain.pipeline import Explanation

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2733;background:#f5f6f8}
main{max-width:1100px;margin:0 auto;padding:18px 22px 40px}
h1{font-size:1.5rem;margin:.2rem 0}h2{font-size:1.15rem;margin:1.6rem 0 .5rem;border-bottom:1px solid #d5d9de;padding-bottom:.25rem}
.notice{background:#fff4e5;border:1px solid #f0b35c;color:#7a4a00;padding:8px 12px;border-radius:6px;font-weight:600}
.card{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:14px 16px;margin:10px 0}
.pred{font-size:1.25rem;font-weight:700}.pred.death{color:#a93226}.pred.alive{color:#1e8449}
.muted{color:#5d6d7e;font-size:.9rem}.explanation{white-space:pre-wrap;line-height:1.5;font-size:1rem}
table{border-collapse:collapse;font-size:.88rem}td,th{padding:3px 8px;border-bottom:1px solid #eceff1;text-align:right}
th:first-child,td:first-child{text-align:left}
.row{display:flex;gap:14px;flex-wrap:wrap}.row>figure{flex:1 1 420px;margin:0}
figure img{max-width:100%;border:1px solid #e1e4e8;border-radius:4px;background:#fff}
figcaption{font-size:.85rem;color:#5d6d7e}
.zoom{overflow:hidden;border:1px solid #e1e4e8;border-radius:4px;cursor:grab;background:#fff}
.zoom img{transform-origin:0 0;display:block;border:0;max-width:100%}
.patches{display:grid;grid-template-columns:repeat(auto-fill,minmax(215px,1fr));gap:10px}
.patch{background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:6px;font-size:.78rem}
.patch img{width:100%;border-radius:4px}.patch table{width:100%;font-size:.72rem}.patch td{padding:1px 3px}
.note{background:#eef3f8;border-left:4px solid #5d8aa8;padding:6px 10px;margin:6px 0;font-size:.9rem}
.flag{background:#fdecea;border:1px solid #e6a19a;color:#7b241c;padding:8px 12px;border-radius:6px;margin:6px 0}
.explanation.flagged{color:#7f8c8d}
.summary{line-height:1.5;font-size:.95rem}
"""

ZOOM_JS = """
document.querySelectorAll('.zoom').forEach(function(box){
  var img=box.querySelector('img'),s=1,x=0,y=0,drag=null;
  function apply(){img.style.transform='translate('+x+'px,'+y+'px) scale('+s+')';}
  box.addEventListener('wheel',function(e){e.preventDefault();var r=box.getBoundingClientRect();
    var mx=e.clientX-r.left,my=e.clientY-r.top,f=e.deltaY<0?1.2:1/1.2,ns=Math.min(12,Math.max(1,s*f));
    x=mx-(mx-x)*ns/s;y=my-(my-y)*ns/s;s=ns;if(s===1){x=0;y=0;}apply();},{passive:false});
  box.addEventListener('mousedown',function(e){drag=[e.clientX-x,e.clientY-y];box.style.cursor='grabbing';});
  window.addEventListener('mouseup',function(){drag=null;box.style.cursor='grab';});
  window.addEventListener('mousemove',function(e){if(drag&&s>1){x=e.clientX-drag[0];y=e.clientY-drag[1];apply();}});
  box.addEventListener('dblclick',function(){s=1;x=0;y=0;apply();});
});
"""


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v: object, digits: int = 3, q: bool = False) -> str:
    if isinstance(v, float | np.floating):
        if not np.isfinite(v):
            return "—"
        return f"{v:.2g}" if q else f"{v:.{digits}f}"
    return _e(v)


def _header(ex: Explanation) -> str:
    p = ex.patient
    outcome, risk, source = ex.final()
    if outcome is None:
        pred = '<div class="pred">No prediction: no model could be applied (see the notes).</div>'
    else:
        cls = "death" if outcome.startswith("death") else "alive"
        pred = (f'<div class="pred {cls}" id="prediction">Predicted: {_e(outcome)} '
                f'(risk {risk:.2f})</div><div class="muted">from the {_e(source)}</div>')
    rows = []
    if ex.omics is not None:
        rows.append(f"<tr><td>omics model</td><td>{ex.omics.prob:.3f}</td></tr>")
    if ex.slide is not None:
        rows.append(f"<tr><td>slide model</td><td>{ex.slide.prob:.3f}</td></tr>")
    if ex.slide_features is not None:
        rows.append(f"<tr><td>slide-feature model (whole-slide image features)</td>"
                    f"<td>{ex.slide_features.prob:.3f}</td></tr>")
    if ex.fusion is not None and ex.fusion.risk is not None:
        rows.append(f"<tr><td>fusion LLM (parsed from its text)</td><td>{ex.fusion.risk:.3f}</td></tr>")
    table = ("<table><tr><th>model</th><th>P(death within 5 years)</th></tr>" + "".join(rows) + "</table>"
             if rows else "")
    split = f" · cohort split: {_e(p.split)}" if p.split else ""
    return (f'<h1>OncoFM report — {_e(p.patient_id)}</h1>'
            f'<div class="muted">cancer type {_e(p.cancer_type)} · input: {_e(p.source)}{split} · '
            f'created {_e(ex.created)}</div>'
            f'<p class="notice" id="notice">{_e(_notice())}</p>'
            f'<div class="card">{pred}{table}</div>')


NOTICE = "Research use only. Not for clinical decisions."


def _notice() -> str:
    return NOTICE + " Predictions come from models trained on a research cohort and may be wrong."


def _explanation(ex: Explanation) -> str:
    if ex.fusion is None:
        body = ('<div class="note" id="explanation-missing">No generated explanation: the fusion LLM did not '
                'run for this patient (see the notes below).</div>')
    elif not ex.text_passed:
        failures = [] if ex.check is None else ex.check.failures
        items = "".join(f"<li><b>{_e(f.rule)}</b>: {_e(f.detail)}<br><span class='muted'>“{_e(f.statement)}”"
                        "</span></li>" for f in failures)
        body = ('<div class="flag" id="explanation-flag"><b>Flagged: this generated explanation failed the automatic '
                'check and must not be read as sound.</b> The headline prediction above comes from the unimodal '
                f'models. Failing statements:<ul id="check-failures">{items}</ul></div>'
                f'<div class="explanation flagged" id="explanation">{_e(ex.fusion.text)}</div>')
    else:
        from oncofm.fusion.checker import RULES

        n = f" ({len(RULES)} rules)"
        body = (f'<div class="explanation" id="explanation">{_e(ex.fusion.text)}</div>'
                f'<div class="muted" id="check-passed">Checked against the evidence record{_e(n)}: every gene, '
                'direction and number is in the evidence, no sentence repeats, and the verdict agrees with the '
                'models.</div>')
    if ex.evidence is not None:
        from oncofm.fusion.templates import evidence_summary

        body += ("<h3>Evidence summary</h3><div class='summary' id='evidence-summary'>"
                 f"{_e(evidence_summary(ex.evidence.to_dict()))}</div><div class='muted'>Rendered from the evidence "
                 "record by a fixed template, not written by the LLM.</div>")
    return f"<h2>Explanation</h2><div class='card'>{body}</div>"


def _notes(ex: Explanation) -> str:
    notes = list(ex.log.notes)
    if not notes:
        return ""
    items = "".join(f'<div class="note">{_e(n)}</div>' for n in notes)
    return f'<h2>Notes: missing modalities, models and checks</h2><div id="notes">{items}</div>'


def _slide(ex: Explanation) -> str:
    if ex.tiled is None:
        return ""
    thumb = data_uri(plots.thumbnail_jpeg(ex.tiled), "image/jpeg")
    if ex.slide is None:
        return (f"<h2>Slide</h2><div class='row'><figure><img src='{thumb}' alt='slide thumbnail'>"
                f"<figcaption>{_e(ex.tiled.path.name)}: {len(ex.tiled.coords)} tissue patches; "
                "no slide model, so no heatmap.</figcaption></figure></div>")
    heat = data_uri(plots.heatmap_overlay_png(ex.tiled, ex.slide.attention))
    att = np.sort(ex.slide.attention)[::-1]
    k = min(10, len(att))
    top10 = float(att[:k].sum())
    return (
        "<h2>Slide and attention heatmap</h2><div class='row'>"
        f"<figure><div class='zoom'><img id='thumbnail' src='{thumb}' alt='slide thumbnail'></div>"
        f"<figcaption>{_e(ex.tiled.path.name)} ({ex.tiled.level0_size[0]}×{ex.tiled.level0_size[1]} px, "
        f"{ex.tiled.mpp:.3g} µm/px)</figcaption></figure>"
        f"<figure><div class='zoom'><img id='heatmap' src='{heat}' alt='attention heatmap'></div>"
        f"<figcaption>Attention of the slide model over {len(att)} patches; the {k} most attended hold "
        f"{100 * top10:.0f}% of it. Wheel to zoom, drag to pan, double-click to reset.</figcaption></figure></div>"
        + _patches(ex))


def _patches(ex: Explanation) -> str:
    if not ex.patches:
        return ""
    cards = []
    for p in ex.patches:
        m = "".join(f"<tr><td>{_e(k)}</td><td>{v:.3g}</td></tr>" for k, v in p.morphometrics.items())
        if p.cells is not None:
            m += "".join(f"<tr><td>{_e(k)} cells (cell model)</td><td>{v}</td></tr>" for k, v in p.cells.items())
        cards.append(f"<div class='patch'><img src='{data_uri(plots.patch_jpeg(p.image), 'image/jpeg')}' "
                     f"alt='patch {p.rank}'><div><b>#{p.rank}</b> attention {p.attention:.4f}<br>"
                     f"at ({p.x}, {p.y})</div><table>{m}</table></div>")
    cells = ""
    summary = ex.patch_summary.cells if ex.patch_summary is not None else None
    if summary:
        def ratio(m: dict) -> str:
            return "—" if m["ratio"] is None else f"{m['ratio']:.2f}"

        rows = "".join(f"<tr><td>{_e(m['description'])}</td><td>{m['top']:.3g}</td><td>{m['slide']:.3g}</td>"
                       f"<td>{ratio(m)}</td></tr>" for m in summary.values())
        cells = ("<h3>Cells in the most attended patches (the cell model's estimate)</h3><table id='cells'>"
                 "<tr><th>measure</th><th>attended patches</th><th>slide (sampled patches)</th><th>ratio</th></tr>"
                 f"{rows}</table><p class='muted'>Counted by OncoFM's cell-type model (trained on BRCA-M2C breast "
                 f"tissue; {_cell_model_accuracy(ex)}): an estimate, not a pathologist's count.</p>")
    return f"<h3>Most attended patches</h3><div class='patches' id='patches'>{''.join(cards)}</div>{cells}"


def _cell_model_accuracy(ex: Explanation) -> str:
    """The run's cell model's own measured test accuracy (``test_metrics.json`` of ``oncofm cells evaluate``)."""
    import json

    from oncofm.paths import RunLayout

    path = RunLayout(ex.settings.run).model_dir("cells") / "test_metrics.json"
    try:
        d = json.loads(path.read_text())
        return (f"macro F1 {float(d['scores']['macro_f1']):.2f} on {int(d['n_images'])} held-out images of "
                f"{int(d['n_patients'])} patients, docs/cells.md")
    except (OSError, ValueError, KeyError, TypeError):
        return "its test accuracy is not stored with this run's model: run `oncofm cells evaluate`; docs/cells.md"


def _genes(ex: Explanation) -> str:
    if ex.omics is None or ex.omics.attributions.empty:
        return ""
    top = ex.settings.top_genes
    img = data_uri(plots.gene_bars_png(ex.omics.attributions, top))
    from oncofm.fusion.evidence import cox_agrees

    table = ex.omics.attributions.head(top).copy()
    table["agrees with Cox"] = np.where(cox_agrees(table), "yes", "no")
    cols = [c for c in ("gene", "attribution", "expression_z", "coef", "q", "agrees with Cox") if c in table]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r[c], q=c == 'q')}</td>" for c in cols) + "</tr>"
                   for _, r in table.iterrows())
    cov = ""
    if ex.omics is not None:
        cov = (f"<figcaption>{ex.omics.n_present} of the model's {ex.omics.n_model_genes} genes were measured; "
               "expression_z is the value normalised with the training statistics, coef the Cox coefficient "
               "for this cancer type; \"agrees with Cox\": the sign of the model's attribution is that of "
               "z × coef; with the default gene rule the explanation cites only genes that agree.</figcaption>")
    return (f"<h2>Top contributing genes</h2><div class='row'><figure><img id='genes' src='{img}' "
            f"alt='gene contributions'>{cov}</figure><div><table>{'<tr>' + head + '</tr>'}{body}</table></div></div>")


def _layers(ex: Explanation) -> str:
    """A multi-omics model's panel: each input's contribution (expression, copy number, mutations, stage,
    grade) and the alterations with the largest attributions, with their state, Cox coefficient and q."""
    res = ex.omics
    if res is None or (res.layer_inputs is None and not res.covariate_effects):
        return ""
    from oncofm.fusion.evidence import alteration_state

    img = data_uri(plots.layer_bars_png(res.layer_contributions()))
    rows = ""
    if res.layer_inputs is not None:
        altered = res.layer_inputs[res.layer_inputs["value"].notna() & (res.layer_inputs["value"] != 0)]
        t = altered[altered["attribution"].abs() >= 0.001]  # what rounds to 0.000 is left out, and counted
        t = t.reindex(t["attribution"].abs().sort_values(ascending=False).index).head(10)
        rows = "".join(f"<tr><td>{_e(r['feature'])}</td><td>{_e(r['layer'])}</td>"
                       f"<td>{_e(alteration_state(str(r['layer']), float(r['value'])))}</td>"
                       f"<td>{_fmt(r['attribution'], 3)}</td><td>{_fmt(r['coef'], 3)}</td>"
                       f"<td>{_fmt(r['q'], q=True)}</td></tr>" for _, r in t.iterrows())
        measured = res.layer_inputs.groupby("layer")["value"].apply(lambda v: f"{int(v.notna().sum())} of {len(v)}")
        given = "; ".join(f"{_e(k)}: {v} model features measured" for k, v in measured.items())
        if len(altered) > len(t):
            given += (f"; {len(altered) - len(t)} further altered feature(s) with |attribution| below 0.001 or "
                      "beyond the 10 largest not listed")
    else:
        given = ""
    stage = "; ".join(f"{k} {'unknown' if not np.isfinite(v) else int(v)} (effect {res.covariate_effects.get(k, 0):+.3f})"
                      for k, v in res.covariates.items())
    table = (f"<table><tr><th>gene</th><th>layer</th><th>state</th><th>attribution</th><th>coef</th><th>q</th></tr>"
             f"{rows}</table>" if rows else "<p class='muted'>No altered copy number or mutation among the model's "
             "features for this patient (wild-type, unchanged or not measured).</p>")
    return (f"<h2>Genomic and clinical inputs</h2><div class='row' id='layers'><figure><img src='{img}' "
            "alt='contribution of each input'><figcaption>Summed integrated gradients per input layer (from the "
            "neutral input: median expression, no copy-number change, wild-type), and for stage and grade the "
            "change of the logit against 'unknown'. "
            f"{given}{'; ' if given and stage else ''}{_e(stage)}.</figcaption></figure><div>{table}</div></div>")


def _image_features(ex: Explanation) -> str:
    """The slide-feature model's panel: the image features behind its prediction, in words, each with the
    patient's value, its percentile within the cancer type and its signed contribution."""
    res = ex.slide_features
    if res is None or res.attributions.empty:
        return ""
    top = res.attributions.head(ex.settings.top_genes)
    img = data_uri(plots.gene_bars_png(top, len(top), label="name",
                                       title="Whole-slide image features: red raises risk, blue lowers it"))
    ref = "all training patients" if res.reference_type in ("", "all") else f"{res.reference_type} training patients"
    def pct(v: float) -> str:
        return "—" if pd.isna(v) else f"{float(v):.0f}"

    rows = "".join(f"<tr><td>{_e(r['name'])}</td><td>{_fmt(r['value'], 3)}</td><td>{pct(r['percentile'])}</td>"
                   f"<td>{_fmt(r['attribution'], 3)}</td></tr>" for _, r in top.iterrows())
    return (f"<h2>Whole-slide image features</h2><div class='row' id='image-features'><figure><img src='{img}' "
            f"alt='image feature contributions'><figcaption>The slide-feature model's largest contributions "
            f"(integrated gradients from the average training patient), with the patient's value and its "
            f"percentile among {_e(ref)}. These features were computed from the whole slide by the tool that "
            "produced them (for hif2gene: PathAI's cell and tissue models); OncoFM reads them, it does not "
            "measure them.</figcaption></figure><div><table><tr><th>feature</th><th>value</th><th>percentile"
            f"</th><th>attribution</th></tr>{rows}</table></div></div>")


def _cohort(ex: Explanation) -> str:
    if ex.cohort is None:
        return ""
    img = data_uri(plots.cohort_png(ex.cohort))
    return (f"<h2>Against the training cohort</h2><figure><img id='cohort' src='{img}' alt='cohort risk'>"
            f"<figcaption>The {_e(ex.cohort.model)} model's probability for this patient against its stored "
            f"predictions for the {len(ex.cohort.risks)} {_e(ex.cohort.cancer_type)} training patients; "
            "right: their observed overall survival, split at this patient's risk.</figcaption></figure>")


def _provenance(ex: Explanation) -> str:
    versions = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in ex.model_versions().items())
    secs = "".join(f"<tr><td>{_e(k)}</td><td>{v:.2f} s</td></tr>" for k, v in ex.log.seconds.items())
    return (f"<h2>Provenance</h2><div class='row'><div><table><tr><th>model</th><th>version</th></tr>{versions}"
            f"</table></div><div><table><tr><th>step</th><th>time</th></tr>{secs}</table></div></div>"
            f"<p class='muted'>run: {_e(ex.settings.run)}</p>")


def render_report(ex: Explanation) -> str:
    """The whole report as one HTML string (no external references)."""
    parts = [_header(ex), _explanation(ex), _notes(ex), _slide(ex), _image_features(ex), _genes(ex), _layers(ex),
             _cohort(ex),
             _provenance(ex)]
    title = f"OncoFM report {ex.patient.patient_id}"
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            + "".join(parts) + f"</main><script>{ZOOM_JS}</script></body></html>")
