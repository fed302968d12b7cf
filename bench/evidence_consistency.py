"""How the gene-selection rule of the evidence record changes what an explanation cites (side by side).

For every patient of a split (default: test) of a run with an omics model, the evidence record is built by
``oncofm.fusion.evidence.build_evidence`` under both rules — ``attribution`` (the largest signed attributions)
and ``consistent`` (the default: only genes whose attribution agrees with the univariate Cox direction
sign(z × coef)) — and the cited genes are compared:

- contradictions: cited genes whose stated direction (the attribution's sign) disagrees with sign(z × coef);
- significance: the share of cited genes with Cox q < 0.05 in the patient's cancer type;
- cost: the share of cited genes that are not among the patient's top genes by attribution under the plain
  rule (how far down the attribution ranking the consistent rule reaches), and the attribution mass cited.

Usage: ``python bench/evidence_consistency.py --run runs/tcga13 [--split test] [--top-genes 3]``
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from oncofm.fusion.evidence import EvidenceSettings, build_evidence, cox_agrees
from oncofm.omics.predict import stored_omics_results
from oncofm.paths import RunLayout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--top-genes", type=int, default=3)
    args = ap.parse_args()
    layout = RunLayout(args.run)
    patients = pd.read_parquet(layout.patients)
    splits = pd.read_parquet(layout.splits).set_index("patient_id")["split"]
    patients = patients[patients["patient_id"].map(splits) == args.split]
    results = stored_omics_results(layout, patients)
    rows = {}
    for rule in ("attribution", "consistent"):
        settings = EvidenceSettings(top_genes=args.top_genes, gene_rule=rule)
        cited, contra, sig, mass = 0, 0, 0, []
        for res in results.values():
            ev = build_evidence("", None, res, None, None, settings)
            table = res.attributions.set_index("gene")
            genes = [g["gene"] for g in ev.risk_genes + ev.protective_genes]
            cited += len(genes)
            agree = cox_agrees(table.loc[genes].reset_index())
            contra += int((~agree).sum())
            sig += sum(1 for g in ev.risk_genes + ev.protective_genes if g["q"] is not None and g["q"] < 0.05)
            total = table["attribution"].abs().sum()
            mass.append(float(table.loc[genes, "attribution"].abs().sum() / total) if total > 0 else np.nan)
        rows[rule] = {"patients": len(results), "cited": cited, "contradicting": contra / max(cited, 1),
                      "q<0.05": sig / max(cited, 1), "attribution mass cited": float(np.nanmean(mass))}
    for rule, r in rows.items():
        print(f"{rule:>11}: {r['patients']} {args.split} patients, {r['cited']} cited genes | contradicting "
              f"sign(z x Cox) {100 * r['contradicting']:.1f}% | q < 0.05 {100 * r['q<0.05']:.1f}% | share of "
              f"|attribution| cited {100 * r['attribution mass cited']:.1f}%")
    a, c = rows["attribution"], rows["consistent"]
    print(f"consistent vs attribution: contradictions {100 * c['contradicting']:.1f}% vs {100 * a['contradicting']:.1f}%; "
          f"attribution mass cited ratio {c['attribution mass cited'] / a['attribution mass cited']:.2f}")


if __name__ == "__main__":
    main()
