"""Patch-feature bags from other tools (oncofm.pathology.feature_bags): the CLAM / TRIDENT / STAMP .h5 layouts,
every bad bag, the import into a run, the slide model trained on imported bags with heatmaps from their
coordinates, and the real mopadi TCGA bags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from oncofm.errors import DataValidationError, OncoFMError
from oncofm.pathology.feature_bags import (
    ExternalFeatureEncoder,
    FeatureBagSettings,
    bag_heatmap,
    feature_bag_train_settings,
    grid_step,
    import_feature_bags,
    read_feature_bag,
)

STEP = 64  # level-0 patch side of the synthetic bags
MOPADI = "pathology/mopadi_tcga_tiles_features"


def _grid(cols: int = 6, rows: int = 5, x0: int = 0) -> np.ndarray:
    gy, gx = np.mgrid[0:rows, 0:cols]
    return np.stack([gx.ravel() * STEP + x0, gy.ravel() * STEP], axis=1).astype(np.int64)


def _trident(path: Path, feats: np.ndarray, coords: np.ndarray, *, encoder: str = "uni_v1") -> Path:
    """TRIDENT's layout: features (N, D) + coords (N, 2), geometry attributes on coords, encoder on features."""
    with h5py.File(path, "w") as f:
        fd = f.create_dataset("features", data=feats)
        fd.attrs["encoder"] = encoder
        cd = f.create_dataset("coords", data=coords)
        cd.attrs.update({"patch_size": STEP // 2, "patch_size_level0": STEP, "level0_magnification": 40,
                         "target_magnification": 20, "overlap": 0, "level0_width": 6 * STEP,
                         "level0_height": 5 * STEP, "name": path.stem})
    return path


def _clam(path: Path, feats: np.ndarray, coords: np.ndarray) -> Path:
    """CLAM's extract_features_fp.py output: features + coords (int32), no attributes."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords.astype(np.int32))
    return path


# ------------------------------------------------------------------------------------------ reading one bag
def test_trident_clam_and_stamp_layouts_give_level0_coords_and_patch_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feats, coords = rng.normal(size=(30, 8)).astype(np.float32), _grid()
    bag = read_feature_bag(_trident(tmp_path / "a.h5", feats, coords))
    assert bag.patch_size_level0 == STEP and bag.attrs["patch_size_source"] == "attribute patch_size_level0"
    assert bag.attrs["layout"] == "trident" and bag.dim == 8 and len(bag) == 30 and bag.name == "a"
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.coords.dtype == np.int64 and bag.features.dtype == np.float32

    with h5py.File(tmp_path / "b.h5", "w") as f:  # older TRIDENT: magnifications only
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords).attrs.update(
            {"patch_size": 256, "level0_magnification": 40, "target_magnification": 20})
    assert read_feature_bag(tmp_path / "b.h5").patch_size_level0 == 512

    clam = read_feature_bag(_clam(tmp_path / "c.h5", feats, coords))  # no attributes: the grid step
    assert clam.patch_size_level0 == STEP and clam.attrs["patch_size_source"] == "grid step of the coordinates"
    assert read_feature_bag(tmp_path / "c.h5", patch_size_level0=100).patch_size_level0 == 100

    with h5py.File(tmp_path / "s.h5", "w") as f:  # STAMP >= 2: feats, coords in µm
        f.create_dataset("feats", data=feats.astype(np.float16))
        f.create_dataset("coords", data=coords * 0.5)  # µm at 0.5 µm/px
        f.attrs.update({"unit": "um", "tile_size_um": STEP * 0.5, "tile_size_px": 224})
    with pytest.raises(OncoFMError, match="in µm .*slide_mpp"):
        read_feature_bag(tmp_path / "s.h5")
    stamp = read_feature_bag(tmp_path / "s.h5", slide_mpp=0.5)
    np.testing.assert_array_equal(stamp.coords, coords)
    assert stamp.patch_size_level0 == STEP and stamp.features.dtype == np.float16
    assert grid_step(np.array([[0, 0]])) is None


def _write(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def test_bad_bags_are_refused_with_one_message(tmp_path: Path) -> None:
    f, c = np.ones((4, 3), np.float32), _grid(2, 2)
    cases = [
        (_write(tmp_path / "nofeat.h5", coords=c, embeddings=f), "no patch-feature dataset.*'embeddings'"),
        (_write(tmp_path / "nocoords.h5", features=f), "no 'coords' dataset"),
        (_write(tmp_path / "mismatch.h5", features=f, coords=c[:3]), r"shape mismatch: 'features' is \(4, 3\) but"),
        (_write(tmp_path / "coords3.h5", features=f, coords=np.ones((4, 3))), "shape mismatch"),
        (_write(tmp_path / "empty.h5", features=np.zeros((0, 3), np.float32), coords=np.zeros((0, 2))), "empty bag"),
        (_write(tmp_path / "nan.h5", features=np.where(np.eye(4, 3) > 0, np.nan, f), coords=c), "NaN values"),
        (_write(tmp_path / "inf.h5", features=np.where(np.eye(4, 3) > 0, np.inf, f), coords=c), "infinite values"),
        (_write(tmp_path / "slide.h5", features=np.ones(3, np.float32), coords=c), "one slide embedding"),
        (_write(tmp_path / "neg.h5", features=f, coords=c - 100), "negative coordinates"),
    ]
    for path, message in cases:
        with pytest.raises(DataValidationError, match=message) as err:
            read_feature_bag(path)
        assert str(path) in str(err.value)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(OncoFMError, match="not a readable HDF5 file"):
        read_feature_bag(tmp_path / "text.h5")
    with pytest.raises(OncoFMError, match="cannot tell the patch size"):
        read_feature_bag(_write(tmp_path / "one.h5", features=f[:1], coords=c[:1] + 5))


# ------------------------------------------------------------------------------------------ into a run, trained on
N_SLIDES = 20
PLANT = np.zeros((5, 6), bool)
PLANT[1:3, 2:5] = True  # a block of 6 patches carries the signal on positive slides


@pytest.fixture(scope="module")
def bag_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("bag_run")
    run, bags, slides = root / "run", root / "features_uni_v1", root / "slides"
    for d in (run / "cohort", bags, slides):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    split_of = ["train"] * 12 + ["val"] * 4 + ["test"] * 4
    patients, splits = [], []
    for i in range(N_SLIDES):
        positive = i % 2 == 1
        pid = f"TCGA-ZZ-{i:04d}"
        feats = rng.normal(size=(30, 16)).astype(np.float32)
        if positive:
            feats[PLANT.ravel(), :4] += 3.0
        _trident(bags / f"{pid}-01Z-00-DX1.{i:04X}AB.h5", feats, _grid())
        patients.append({"patient_id": pid, "cancer_type": "TEST", "age": 60.0, "sex": "female",
                         "os_days": 400.0 if positive else 2500.0, "os_event": int(positive)})
        splits.append({"patient_id": pid, "split": split_of[i]})
    _trident(bags / "TCGA-YY-0001-01Z-00-DX1.h5", np.ones((30, 16), np.float32), _grid())  # not in the cohort
    pd.DataFrame(patients).to_parquet(run / "cohort" / "patients.parquet")
    pd.DataFrame(splits).to_parquet(run / "cohort" / "splits.parquet")
    # the slide file of one slide (a plain image at 0.25 µm/px), for `oncofm heatmap`
    img = np.full((5 * STEP, 6 * STEP, 3), 230, np.uint8)
    img[STEP:3 * STEP, 2 * STEP:5 * STEP] = (120, 60, 150)
    Image.fromarray(img).save(slides / "TCGA-ZZ-0001-01Z-00-DX1.0001AB.png")
    return run


def test_import_writes_the_feature_cache_tiles_and_slides_table(bag_run: Path) -> None:
    from oncofm.pathology.slide_model import extract_features, load_patch_features
    from oncofm.pathology.tiling import load_grid

    bags, slides = bag_run.parent / "features_uni_v1", bag_run.parent / "slides"
    paths = import_feature_bags(FeatureBagSettings(run=str(bag_run), source=str(bags), encoder="external-uni",
                                                   slides=str(slides), slide_mpp=0.25))
    summary = json.loads(paths["summary"].read_text())
    assert summary["dim"] == 16 and summary["n_imported"] == N_SLIDES and summary["n_unmatched"] == 1
    assert summary["unmatched_examples"] == ["TCGA-YY-0001-01Z-00-DX1"]
    table = pd.read_parquet(paths["slides_table"])
    assert len(table) == N_SLIDES and table["patient_id"].is_unique
    stem = "TCGA-ZZ-0001-01Z-00-DX1.0001AB"
    assert set(table["slide_id"]) >= {f"{stem}.png", "TCGA-ZZ-0000-01Z-00-DX1.0000AB.h5"}

    grid = load_grid(bag_run / "tiles" / f"{stem}.h5")  # the tiles contract, from the coordinates
    np.testing.assert_array_equal(grid.coords, _grid())
    assert grid.attrs["level0_size"] == STEP and grid.attrs["source"] == "feature_bag"
    assert grid.attrs["patch_size"] == STEP // 2 and grid.attrs["width"] == 6 * STEP
    assert grid.attrs["slide_path"].endswith(".png") and grid.attrs["slide_mpp"] == 0.25
    other = load_grid(bag_run / "tiles" / "TCGA-ZZ-0000-01Z-00-DX1.0000AB.h5")
    assert other.attrs["slide_path"] == "" and other.attrs["height"] == 5 * STEP  # from the bag's attributes

    cache = paths["features_dir"] / f"{stem}.h5"
    feats, coords = load_patch_features(cache)
    assert feats.shape == (30, 16)
    # train slide's extract_features finds it encoded and never calls the (pixel-refusing) encoder
    enc = ExternalFeatureEncoder(16, name="external-uni")
    assert extract_features(enc, bag_run / "tiles" / f"{stem}.h5", cache, encoder_name="external-uni") == cache
    with pytest.raises(OncoFMError, match="cannot encode pixels"):
        enc(torch.rand(1, 3, 32, 32))

    before = cache.stat().st_mtime_ns  # same settings and bags: reused
    import_feature_bags(FeatureBagSettings(run=str(bag_run), source=str(bags), encoder="external-uni",
                                           slides=str(slides), slide_mpp=0.25))
    assert cache.stat().st_mtime_ns == before


def test_slide_model_trains_on_imported_bags_with_heatmaps(bag_run: Path) -> None:
    from oncofm.pathology.heatmap import HeatmapSettings, heatmaps_for_run
    from oncofm.pathology.predict import SlidePredictor
    from oncofm.pathology.slide_train import train_slide_model
    from oncofm.paths import RunLayout
    from oncofm.survival.metrics import auc_score

    if not (bag_run / "models" / "slide" / "features" / "external-uni" / "import.json").exists():
        test_import_writes_the_feature_cache_tiles_and_slides_table(bag_run)
    settings = feature_bag_train_settings(bag_run, "external-uni", hidden=16, standardize_features=True,
                                          train={"epochs": 12, "batch_size": 4, "lr": 3e-3, "patience": 12,
                                                 "progress": False, "device": "cpu"})
    assert settings.encoder_options == {"dim": 16} and settings.mode == "features"
    paths = train_slide_model(settings, progress=False)
    preds = pd.read_parquet(paths["predictions"])
    y = preds["patient_id"].str.slice(-4).astype(int) % 2
    assert auc_score(y, preds["prob"]) >= 0.9  # the planted block is learnt from slide labels alone
    stem = "TCGA-ZZ-0001-01Z-00-DX1.0001AB"
    att = pd.read_parquet(paths["attention"] / f"{stem}.parquet")
    np.testing.assert_array_equal(att[["x", "y"]].to_numpy(), _grid())  # the bag's own coordinates
    inside = PLANT[att["y"] // STEP, att["x"] // STEP]
    assert att["attention"][inside].mean() > 1.5 * att["attention"][~inside].mean()  # measured 1.76

    # the predictor loads (the placeholder encoder is registered) and reproduces the export
    predictor = SlidePredictor.from_run(RunLayout(bag_run))
    feats = read_feature_bag(bag_run.parent / "features_uni_v1" / f"{stem}.h5").features
    assert abs(predictor.predict_features([feats])[0].prob - float(preds.set_index("patient_id").loc[
        "TCGA-ZZ-0001", "prob"])) < 1e-5
    # heatmaps: `oncofm heatmap` over the slide file, and from the coordinates alone without one
    written = heatmaps_for_run(bag_run, [stem], HeatmapSettings(thumb_size=128, top_k=3), progress=False)
    assert [p.name for p in written] == [f"{stem}_heatmap.png", f"{stem}_top.png"]
    png = bag_heatmap(bag_run, "TCGA-ZZ-0002-01Z-00-DX1.0002AB", settings=HeatmapSettings(thumb_size=128))
    assert png.exists() and png.stat().st_size > 1000


def test_import_refuses_unmatched_bags_and_foreign_tiles(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "cohort").mkdir(parents=True)
    pd.DataFrame({"patient_id": ["TCGA-ZZ-0000"], "cancer_type": ["TEST"], "os_days": [10.0],
                  "os_event": [1]}).to_parquet(run / "cohort" / "patients.parquet")
    bags = tmp_path / "bags"
    bags.mkdir()
    _clam(bags / "TCGA-YY-0009-01Z-00-DX1.h5", np.ones((30, 4), np.float32), _grid())
    with pytest.raises(DataValidationError, match="none of the 1 bags belongs to a patient"):
        import_feature_bags(FeatureBagSettings(run=str(run), source=str(bags)))
    _clam(bags / "TCGA-ZZ-0000-01Z-00-DX1.h5", np.ones((30, 4), np.float32), _grid())
    (run / "tiles").mkdir()
    _write(run / "tiles" / "TCGA-ZZ-0000-01Z-00-DX1.h5", coords=_grid(3, 3))  # from `oncofm tile`
    with pytest.raises(OncoFMError, match="exists and was not made from a feature bag"):
        import_feature_bags(FeatureBagSettings(run=str(run), source=str(bags)))
    assert not (run / "models").exists() and not (run / "cohort" / "slides.parquet").exists()
    with pytest.raises(OncoFMError, match="must start with 'external'"):
        FeatureBagSettings.build(run=str(run), source=str(bags), encoder="uni")


# ------------------------------------------------------------------------------------------ real bags (mopadi)
def test_real_mopadi_tcga_bag_imports_into_the_tcga13_cohort(shared_data: Path, tcga13_run: Path,
                                                             tmp_path: Path) -> None:
    from oncofm.pathology.tiling import load_grid

    folder = shared_data / MOPADI
    bag = read_feature_bag(folder / "TCGA-AD-6964-01Z-00-DX1" / "features.h5")
    assert bag.name == "TCGA-AD-6964-01Z-00-DX1" and bag.features.shape == (777, 512)
    assert bag.attrs["features_key"] == "feats" and bag.patch_size_level0 == 512  # the coordinates' grid step
    assert bag.coords[:, 0].min() == 9728 and bag.coords[:, 1].max() == 27648
    with pytest.raises(DataValidationError, match="no 'coords' dataset.*'metadata'"):  # tile names only
        read_feature_bag(folder / "TCGA-3X-AAVA-01Z-00-DX1" / "features.h5")

    run = tmp_path / "run"
    (run / "cohort").mkdir(parents=True)
    for name in ("patients.parquet", "splits.parquet", "slides.parquet"):
        shutil.copy(tcga13_run / "cohort" / name, run / "cohort" / name)
    n_listed = len(pd.read_parquet(run / "cohort" / "slides.parquet"))
    paths = import_feature_bags(FeatureBagSettings(run=str(run), source=[str(folder / "TCGA-AD-6964-01Z-00-DX1" /
                                                                             "features.h5")]))
    summary = json.loads(paths["summary"].read_text())
    (item,) = summary["slides"]
    # matched to the cohort's listed slide by its barcode: the uuid file stem, no new slides.parquet row
    assert item["stem"] == "TCGA-AD-6964-01Z-00-DX1.83AF88B9-C59B-48C6-A739-85ACB8F8ECA9"
    assert item["patient_id"] == "TCGA-AD-6964" and item["n_patches"] == 777 and summary["dim"] == 512
    assert len(pd.read_parquet(run / "cohort" / "slides.parquet")) == n_listed
    grid = load_grid(run / "tiles" / f"{item['stem']}.h5")
    assert len(grid) == 777 and grid.attrs["level0_size"] == 512
