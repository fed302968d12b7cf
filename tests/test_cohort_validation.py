"""Every bad input stops `oncofm cohort import` with one message naming the file, the column and a few
offending rows — exit status 2, no traceback, nothing written to RUN/cohort.

Inputs are small generic-format files made from 20 real tcga13 patients, with one defect planted each.
The CLI runs in-process through ``oncofm.cli.main`` (the entry point with the error handling).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from oncofm.data import demo_data_dir

N = 20


@pytest.fixture(scope="module")
def good():
    root = demo_data_dir()
    patients = pd.read_csv(root / "patients.csv").head(N)
    expr = pd.read_csv(root / "expression_zscore.csv.gz", index_col=0).loc[patients.case_id]
    expr = expr.loc[:, expr.notna().all()].iloc[:, :10]
    clinical = pd.DataFrame({"patient_id": patients.case_id, "cancer_type": patients.tcga_project,
                             "os_days": (patients.survival_months * 30.4375).round(1),
                             "os_event": patients.event})
    return clinical, expr.rename_axis("patient_id")


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from oncofm.cli import main

    monkeypatch.setattr(sys, "argv", ["oncofm", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _write(tmp_path, clinical: pd.DataFrame, expr: pd.DataFrame | str, expr_name: str = "expr.csv"):
    c, e = tmp_path / "clinical.csv", tmp_path / expr_name
    clinical.to_csv(c, index=False)
    if isinstance(expr, str):
        e.write_text(expr)
    else:
        expr.to_csv(e)
    return c, e


def _dup_patient(c, e):
    c = pd.concat([c, c.iloc[[3]]])
    return c, e


def _dup_patient_expr(c, e):
    e = pd.concat([e, e.iloc[[4]]])
    return c, e


def _neg_time(c, e):
    c = c.copy()
    c.loc[5, "os_days"] = -12.0
    return c, e


def _missing_time(c, e):
    c = c.copy()
    c.loc[6, "os_days"] = np.nan
    return c, e


def _bad_event(c, e):
    c = c.copy()
    c.loc[7, "os_event"] = 2
    return c, e


def _text_expr(c, e):
    e = e.astype(object)
    e.iloc[8, 2] = "high"
    return c, e


def _inf_expr(c, e):
    e = e.copy()
    e.iloc[9, 3] = np.inf
    return c, e


def _dup_gene(c, e):
    e = e.copy()
    cols = list(e.columns)
    cols[4] = cols[1]
    e.columns = cols
    return c, e


def _missing_column(c, e):
    return c.drop(columns=["os_event"]), e


def _no_match(c, e):
    c = c.copy()
    c["patient_id"] = [f"PT-{i:04d}" for i in range(len(c))]
    return c, e


CASES = {
    # name: (mutate, [expected text], file that must be named)
    "duplicate patient IDs (clinical)": (_dup_patient, ["duplicate patient IDs", "column 'patient_id'"], "clinical.csv"),
    "duplicate patient IDs (expression)": (_dup_patient_expr, ["duplicate patient IDs"], "expr.csv"),
    "negative survival time": (_neg_time, ["survival times must be present, finite and >= 0",
                                           "column 'os_days'", "=-12.0"], "clinical.csv"),
    "missing survival time": (_missing_time, ["survival times must be present", "column 'os_days'", "=nan"],
                              "clinical.csv"),
    "events not 0/1": (_bad_event, ["events must be 0 or 1", "column 'os_event'", "=2"], "clinical.csv"),
    "non-numeric expression": (_text_expr, ["non-numeric expression values", "'high'"], "expr.csv"),
    "infinite expression": (_inf_expr, ["infinite expression values"], "expr.csv"),
    "duplicated genes": (_dup_gene, ["duplicated genes"], "expr.csv"),
    "missing required column": (_missing_column, ["missing required column(s) ['os_event']"], "clinical.csv"),
    "clinical matches no expression rows": (_no_match, ["matches no expression rows", "PT-0000"], "clinical.csv"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_clear_message(name, good, tmp_path, monkeypatch, capsys):
    mutate, expected, named = CASES[name]
    clinical, expr = mutate(*good)
    c, e = _write(tmp_path, clinical, expr)
    run = tmp_path / "run"
    code, out = run_cli(["cohort", "import", "--format", "generic", "--source", str(e), "--clinical", str(c),
                         "--run", str(run), "--option", "orientation=genes-as-columns"], monkeypatch, capsys)
    assert code == 2, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    assert str(tmp_path / named) in errors[0], errors[0]
    for text in expected:
        assert text in errors[0], errors[0]
    if "rows" in errors[0]:  # the offending rows are patient IDs (or values), a few at most
        assert errors[0].count("TCGA-") <= 6 or "PT-" in errors[0]
    assert not (run / "cohort").exists() or not any((run / "cohort").iterdir())
    assert not (run / "settings").exists()


def test_offending_rows_named_and_capped(good, tmp_path, monkeypatch, capsys):
    clinical, expr = good
    clinical = clinical.copy()
    clinical.loc[:7, "os_event"] = 3  # 8 bad rows: 5 shown + "and 3 more"
    c, e = _write(tmp_path, clinical, expr)
    code, out = run_cli(["cohort", "import", "-f", "generic", "-s", str(e), "--clinical", str(c),
                         "-r", str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 2 and "(and 3 more)" in out
    assert f"{clinical.patient_id[0]}=3" in out


@pytest.mark.parametrize("args,expected", [
    (["--format", "foo"], "unknown cohort format 'foo'; choose one of: firehose, gdc, generic, tcga13"),
    (["--format", "generic", "--option", "orientation=sideways"], "orientation must be one of"),
    (["--format", "generic", "--option", "colour=red"], "unknown generic option(s) ['colour']"),
])
def test_bad_settings(args, expected, good, tmp_path, monkeypatch, capsys):
    c, e = _write(tmp_path, *good)
    code, out = run_cli(["cohort", "import", "--source", str(e), "--clinical", str(c),
                         "--run", str(tmp_path / "run"), *args], monkeypatch, capsys)
    assert code == 2 and expected in out and "Traceback" not in out


def test_unknown_table_format(good, tmp_path, monkeypatch, capsys):
    c, _ = _write(tmp_path, *good)
    e = tmp_path / "expr.xlsx"
    e.write_bytes(b"PK\x03\x04 not really")
    code, out = run_cli(["cohort", "import", "-f", "generic", "-s", str(e), "--clinical", str(c),
                         "-r", str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 2 and "unknown table format" in out and str(e) in out


def test_firehose_wrong_layout_and_tcga13_missing_column(good, tmp_path, monkeypatch, capsys, shared_data):
    clinical, expr = good
    e = tmp_path / "x.RSEM_genes_normalized__data.data.txt"
    expr.T.to_csv(e, sep="\t")  # no "Hybridization REF" / "gene_id" rows
    code, out = run_cli(["cohort", "import", "-f", "firehose", "-s", str(e), "-r", str(tmp_path / "r1"),
                         "--clinical", str(shared_data / "tcga_cdr" / "tcga_cdr_clinical.csv")], monkeypatch, capsys)
    assert code == 2 and "not a Firehose RSEM matrix" in out and str(e) in out
    folder = tmp_path / "t13"
    folder.mkdir()
    pd.read_csv(demo_data_dir() / "patients.csv").head(N).drop(columns=["event"]).to_csv(folder / "patients.csv",
                                                                                       index=False)
    expr.to_csv(folder / "expression_zscore.csv.gz")
    code, out = run_cli(["cohort", "import", "-f", "tcga13", "-s", str(folder), "-r", str(tmp_path / "r2")],
                        monkeypatch, capsys)
    assert code == 2 and "missing required column(s) ['event']" in out and "patients.csv" in out


def test_soft_problems_are_counted_not_fatal(good, tmp_path, monkeypatch, capsys):
    """Patients without a 5-year label and genes missing in one cancer type: imported, counted, summarised."""
    clinical, expr = good
    clinical = clinical.copy()
    clinical.loc[:9, "cancer_type"] = "AAA"
    clinical.loc[10:, "cancer_type"] = "BBB"
    expr = expr.copy()
    expr.iloc[:10, :3] = np.nan  # 3 genes not measured in cancer type AAA
    c, e = _write(tmp_path, clinical, expr)
    run = tmp_path / "run"
    code, out = run_cli(["cohort", "import", "-f", "generic", "-s", str(e), "--clinical", str(c), "-r", str(run)],
                        monkeypatch, capsys)
    assert code == 0, out
    notes = pd.read_json(run / "cohort" / "import_notes.json", typ="series")
    soft = notes["soft_problems"]
    from oncofm.survival.endpoints import horizon_label

    n_unlabelled = int(np.isnan(horizon_label(clinical.os_days, clinical.os_event)).sum())
    assert soft["patients_without_5y_label"] == n_unlabelled > 0
    assert soft["genes_missing_in_some_cohorts"] == 3
    assert soft["gene_overlap_fraction"] == pytest.approx(0.7)
    code, out = run_cli(["cohort", "summary", "-r", str(run)], monkeypatch, capsys)
    assert "genes_missing_in_some_cohorts" in out and "patients_without_5y_label" in out
    assert (run / "cohort" / "km_by_cancer_type.png").stat().st_size > 10_000
