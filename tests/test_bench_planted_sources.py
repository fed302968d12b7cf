"""Source loading and splitting of the planted-region benchmark (``bench/planted_sources.py``, issue 20).

Reads the real images of ``shared/data/pathology``; skipped where that folder is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import planted_sources as ps  # noqa: E402

pytestmark = pytest.mark.skipif(not (ps.DATA / "brca_m2c_tcga_rois" / "MANIFEST.csv").exists(),
                                reason=f"real pathology data not found under {ps.DATA}")


@pytest.fixture(scope="module")
def raws() -> list:
    return ps.load_raw("all")[0]


@pytest.fixture(scope="module")
def sources(raws: list) -> dict:
    """Sources without the (slow) stain normalisation: the split only needs provenance."""
    return {r.name: ps.Source(r.name, r.images[0], None, [], r.patient, r.dataset, r.organ, r.frozen) for r in raws}


@pytest.mark.parametrize("dataset", sorted(ps.EXTRA_LOADERS))
def test_each_new_loader_returns_rgb_at_half_micron(raws: list, dataset: str) -> None:
    mine = [r for r in raws if r.dataset == dataset]
    assert mine
    for r in mine:
        assert r.mpp == pytest.approx(0.5, abs=0.05), (r.name, r.mpp)
        for img in r.images:
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            assert min(img.shape[:2]) >= 2 * 96  # room for random 96-px cells
            assert 60 < img.mean() < 245  # tissue, not glass or black


def test_brca_m2c_is_one_source_per_patient(raws: list) -> None:
    bc = [r for r in raws if r.dataset == "bc"]
    assert len(bc) == 95 and sum(len(r.images) for r in bc) == 101
    assert len({r.patient for r in bc}) == 95


def test_breast_split_is_disjoint_by_patient_and_seeded(sources: dict) -> None:
    split = ps.split_breast(sources, seed=0)
    assert ps.disjoint_by_patient(split, sources)
    patients = {k: {sources[n].patient for n in v} for k, v in split.items()}
    for part_a in ("train", "val", "test"):
        for part_b in ("train", "val", "test"):
            if part_a != part_b:
                assert not (patients[f"planted_{part_a}"] | patients[f"bg_{part_a}"]) & (
                    patients[f"planted_{part_b}"] | patients[f"bg_{part_b}"])
    # the 3 patients with a MoNuSeg tile and a BRCA-M2C region land on one side
    for p in ("TCGA-A7-A13E", "TCGA-A7-A13F", "TCGA-AC-A2FO"):
        sides = {k for k, v in split.items() if f"bc:{p}" in v or f"mn:{p}" in v}
        assert len(sides) == 1, (p, sides)
    planted = split["planted_train"] + split["planted_val"] + split["planted_test"]
    assert all(sources[n].organ == "breast" for n in planted)
    assert not any(sources[n].organ == "breast" for n in split["bg_train"] + split["bg_val"] + split["bg_test"])
    assert sorted(planted + split["bg_train"] + split["bg_val"] + split["bg_test"]) == sorted(sources)
    assert len(split["planted_train"]) >= 40 and len(split["planted_test"]) >= 25 and len(split["planted_val"]) >= 10
    assert ps.split_breast(sources, seed=0) == split
    assert ps.split_breast(sources, seed=1) != split


def test_brain_split_with_all_sources_keeps_monuseg_split(sources: dict) -> None:
    import pandas as pd

    import slide_mil

    manifest = pd.read_csv(ps.DATA / "monuseg_tcga_tiles" / "MANIFEST.csv")
    default = {n: s for n, s in sources.items() if n.split(":")[0] in ("mn", "pf", "cmu")}
    base = slide_mil.split_sources(default, manifest, "brain", "monuseg", 0, "default")
    split = slide_mil.split_sources(sources, manifest, "brain", "monuseg", 0, "all")
    assert ps.disjoint_by_patient(split, sources)
    assert split["planted_train"] == base["planted_train"] and split["planted_test"] == base["planted_test"]
    assert set(base["bg_train"]) <= set(split["bg_train"]) and set(base["bg_test"]) <= set(split["bg_test"])
    assert "bc:TCGA-AC-A2FO" in split["bg_test"]  # its MoNuSeg tile is a MoNuSeg test tile
    assert "bc:TCGA-A7-A13E" in split["bg_train"]


def test_random_crop_draws_from_every_tile_of_a_source() -> None:
    sys.path.insert(0, str(BENCH))
    import slide_mil

    tiles = [np.full((128, 128, 3), v, np.uint8) for v in (50, 100, 150)]
    ones = np.ones((128, 128), bool)
    src = ps.Source("x", tiles[0], ones, [(t, ones) for t in tiles[1:]])
    rng = np.random.default_rng(0)
    seen = {int(slide_mil.random_crop(src, rng)[0, 0, 0]) for _ in range(60)}
    assert seen == {50, 100, 150}
