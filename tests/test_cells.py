"""Cell-type model (issue 20): detection on planted nuclei, the matching metric on a hand-computed case, every
registered design's fit / predict / save-load contract, the by-patient split, findings and a real-data smoke
test on one BRCA-M2C image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from oncofm.errors import OncoFMError
from oncofm.pathology.cells import CLASSES, CellModel, cell_findings, compare_findings
from oncofm.pathology.cells.data import (
    AnnotatedImage,
    check_split,
    load_images,
    load_manifest,
    split_by_patient,
)
from oncofm.pathology.cells.designs import Detections
from oncofm.pathology.cells.detect import nucleus_candidates
from oncofm.pathology.cells.findings import CellFindings
from oncofm.pathology.cells.metrics import detection_scores, match_points
from oncofm.pathology.cells.registry import design_class, list_designs


def planted(seed: int = 0, side: int = 96, n: int = 12) -> AnnotatedImage:
    """Dark round nuclei (radius 4-5 px, hematoxylin blue-purple) at known, well separated positions on a
    pale pink background with noise; classes cycle through the three."""
    rng = np.random.default_rng(seed)
    pts: list[tuple[float, float]] = []
    while len(pts) < n:
        p = rng.uniform(10, side - 10, 2)
        if all(np.hypot(*(p - q)) > 16 for q in pts):
            pts.append(tuple(p))
    points = np.round(np.array(pts))
    img = np.empty((side, side, 3), np.float64)
    img[:] = (235, 200, 220)
    yy, xx = np.mgrid[:side, :side]
    for k, (x, y) in enumerate(points):
        r = 4.0 + (k % 2)
        inside = (xx - x) ** 2 + (yy - y) ** 2 <= r ** 2
        img[inside] = (70, 45, 130)
    img += rng.normal(0, 4, img.shape)
    labels = np.arange(n) % len(CLASSES)
    return AnnotatedImage(f"planted{seed}.png", f"P{seed}", np.clip(img, 0, 255).astype(np.uint8), points, labels)


def test_log_detector_finds_planted_nuclei_within_radius() -> None:
    a = planted(0)
    found = nucleus_candidates(a.image, threshold=0.15)
    pi, gi = match_points(found, a.points, radius=3.0)
    assert len(gi) == len(a.points)  # every planted nucleus found within 3 px (1.5 µm)
    assert len(found) == len(a.points)  # and nothing else on the plain background
    assert np.all(np.hypot(*(found[pi] - a.points[gi]).T) <= 1.5)


def test_hungarian_matching_beats_greedy_on_a_hand_case() -> None:
    gt = np.array([[0.0, 0.0], [8.0, 0.0]])
    pred = np.array([[3.0, 0.0], [-4.0, 0.0]])  # greedy pairs A-gt0 (3 px) and leaves B unmatched
    pi, gi = match_points(pred, gt, radius=6.0)
    assert sorted(zip(pi.tolist(), gi.tolist(), strict=True)) == [(0, 1), (1, 0)]  # A-gt1 (5), B-gt0 (4)
    assert len(match_points(pred, gt, radius=2.0)[0]) == 0
    assert len(match_points(np.zeros((0, 2)), gt, radius=6.0)[0]) == 0


def test_detection_scores_hand_computed() -> None:
    # image 1: gt inflammatory at (0,0), epithelial at (20,0), stromal at (40,0)
    #   pred inflammatory at (2,0) (TP), epithelial at (40,1) (wrong class: FP epithelial, FN stromal),
    #   epithelial at (100,100) (FP); epithelial gt at (20,0) is missed (FN)
    # image 2: gt epithelial at (5,5); pred epithelial at (5,9) (TP at radius 6)
    gts = [(np.array([[0, 0], [20, 0], [40, 0]], float), np.array([0, 1, 2])),
           (np.array([[5, 5]], float), np.array([1]))]
    preds = [(np.array([[2, 0], [40, 1], [100, 100]], float), np.array([0, 1, 1])),
             (np.array([[5, 9]], float), np.array([1]))]
    s = detection_scores(preds, gts, radius=6.0)
    assert (s["inflammatory"]["tp"], s["inflammatory"]["fp"], s["inflammatory"]["fn"]) == (1, 0, 0)
    assert (s["epithelial"]["tp"], s["epithelial"]["fp"], s["epithelial"]["fn"]) == (1, 2, 1)
    assert (s["stromal"]["tp"], s["stromal"]["fp"], s["stromal"]["fn"]) == (0, 0, 1)
    assert s["epithelial"]["precision"] == pytest.approx(1 / 3)
    assert s["epithelial"]["recall"] == pytest.approx(1 / 2)
    assert s["epithelial"]["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # 0.4
    assert s["stromal"]["f1"] == 0.0
    assert s["macro_f1"] == pytest.approx((1.0 + 0.4 + 0.0) / 3)
    # class-agnostic: (2,0), (40,1), (5,9) match; (100,100) is FP; (20,0) is FN
    assert (s["all"]["tp"], s["all"]["fp"], s["all"]["fn"]) == (3, 1, 1)


def _tiny_settings(tmp_path):  # noqa: ANN202
    from oncofm.pathology.cells.settings import CellTrainSettings, GbmSettings, UNetSettings
    from oncofm.training import TrainSettings

    return CellTrainSettings(
        data=str(tmp_path), out=str(tmp_path / "model"), radius_um=3.0,
        gbm=GbmSettings(max_iter=5, candidate_threshold=0.1),
        unet=UNetSettings(base_channels=4, crop=64, steps_per_epoch=2,
                          train=TrainSettings(epochs=1, batch_size=2, progress=False, device="cpu")))


@pytest.mark.parametrize("name", list_designs())
def test_every_registered_design_fits_predicts_and_round_trips(name: str, tmp_path) -> None:
    import torch

    torch.manual_seed(0)
    train, val = [planted(1), planted(2)], [planted(3)]
    design = design_class(name).fit(train, val, _tiny_settings(tmp_path), tmp_path / "work")
    model = CellModel(design, [0.05, 0.05, 0.05])
    images = [planted(4).image, planted(5).image[:72, :80]]  # two sizes
    before = model.predict(images)
    assert len(before) == 2
    for d in before:
        assert isinstance(d, Detections)
        assert d.points.shape == (len(d), 2) and d.labels.shape == (len(d),) and d.scores.shape == (len(d),)
        assert np.all((d.labels >= 0) & (d.labels < len(CLASSES)))
        assert np.all((d.scores >= 0.05) & (d.scores <= 1))
    model.save(tmp_path / "saved")
    after = CellModel.load(tmp_path / "saved").predict(images)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=0)


def test_unet_options_ema_balanced_crops_hed_and_tta_fit_and_round_trip(tmp_path) -> None:
    """The U-Net's training options (weight EMA, class-balanced crops, HED jitter) and its test-time
    transforms: it fits, keeps ``tta`` in its saved parameters and predicts the same after loading."""
    import torch

    torch.manual_seed(0)
    settings = _tiny_settings(tmp_path)
    settings.unet = settings.unet.model_copy(update={"ema_decay": 0.9, "focus_fraction": 0.5, "hed_jitter": 0.1,
                                                     "tta": 4})
    design = design_class("unet").fit([planted(1), planted(2)], [planted(3)], settings, tmp_path / "work")
    assert design.params()["tta"] == 4
    model = CellModel(design, [0.05, 0.05, 0.05])
    images = [planted(4).image[:72, :80]]
    before = model.predict(images)
    model.save(tmp_path / "saved")
    loaded = CellModel.load(tmp_path / "saved")
    assert loaded.design.tta == 4
    after = loaded.predict(images)
    np.testing.assert_array_equal(before[0].points, after[0].points)
    np.testing.assert_allclose(before[0].scores, after[0].scores, rtol=0, atol=0)
    from oncofm.pathology.cells.settings import UNetSettings

    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        UNetSettings(tta=3)


def test_ensemble_of_identical_members_predicts_as_the_member(tmp_path) -> None:
    import torch

    from oncofm.pathology.cells.unet import PointUNet, UNetDesign, UNetEnsembleDesign

    torch.manual_seed(0)
    member = UNetDesign(PointUNet(4), 4, 3)
    ens = UNetEnsembleDesign.from_members([member, member], tta=1)
    image = [planted(4).image]
    a, b = member.predict(image, 0.05)[0], ens.predict(image, 0.05)[0]
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    with pytest.raises(OncoFMError, match="share"):
        UNetEnsembleDesign.from_members([member, UNetDesign(PointUNet(8), 8, 3)])


def test_tta_maps_are_mapped_back_to_the_input_frame() -> None:
    """Averaged over the 8 dihedral transforms, the maps of a flipped or transposed input are the flipped or
    transposed maps; with 1 transform they are the network's own output."""
    import torch

    from oncofm.pathology.cells.unet import PointUNet, _averaged_maps

    torch.manual_seed(0)
    net = PointUNet(4).eval()
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        heat, probs = _averaged_maps(net, x, 8)
        for op in (lambda t: t.flip(-1), lambda t: t.flip(-2), lambda t: t.transpose(-1, -2)):
            h2, p2 = _averaged_maps(net, op(x), 8)
            torch.testing.assert_close(h2, op(heat), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(p2, op(probs), rtol=1e-4, atol=1e-5)
        h1, _ = _averaged_maps(net, x, 1)
        torch.testing.assert_close(h1, torch.sigmoid(net(x)[:, 0]))


def test_balanced_crops_centre_on_rare_classes_and_hed_jitter_keeps_colour_near() -> None:
    from oncofm.pathology.cells.unet import _Crops, targets

    a = planted(1, side=160, n=30)
    keep = (a.labels != 0) | (np.arange(len(a.labels)) < 3)  # only 3 of class 0
    pts, lab = a.points[keep], a.labels[keep]
    heat, cls = targets(a.image.shape[:2], pts, lab, 2.0, 4.0)
    plain = _Crops([a.image], [heat], [cls], 64, 60, 0.0)
    focus = _Crops([a.image], [heat], [cls], 64, 60, 0.0, focus_fraction=1.0, dots=[(pts, lab)])
    share = [np.mean([(d[2] == 0).sum() / max((d[2] >= 0).sum(), 1) for d in (ds[i] for i in range(60))])
             for ds in (plain, focus)]
    assert share[1] > share[0]  # class 0 is drawn a third of the time, not by its area
    x = _Crops([a.image], [heat], [cls], 64, 1, 0.0, hed_jitter=0.01)[0][0]
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert abs(float(x.mean()) - a.image.mean() / 255) < 0.1


def test_unknown_design_and_missing_model_say_what_to_do(tmp_path) -> None:
    with pytest.raises(OncoFMError, match="log-gbm"):
        design_class("resnet-999")
    with pytest.raises(OncoFMError, match="oncofm cells train"):
        CellModel.load(tmp_path)


def test_split_is_by_patient_without_overlap(shared_data) -> None:
    manifest = load_manifest(shared_data / "pathology" / "brca_m2c_tcga_rois")
    split = split_by_patient(manifest, 0.15, 0.2, seed=0)
    check_split(split)
    assert len(split) == len(manifest) == 101
    patients = {s: set(split.loc[split["split"] == s, "patient"]) for s in ("train", "val", "test")}
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["val"])
    assert not (patients["val"] & patients["test"])
    assert sum(len(p) for p in patients.values()) == manifest["patient_barcode"].nunique() == 95
    # patients with two images keep both in one split
    twice = manifest["patient_barcode"].value_counts()
    assert (twice > 1).any()
    assert split.groupby("patient")["split"].nunique().max() == 1
    pd.testing.assert_frame_equal(split, split_by_patient(manifest, 0.15, 0.2, seed=0))  # deterministic
    leaked = split.copy()
    leaked.loc[leaked.index[0], "split"] = "test" if leaked.loc[leaked.index[0], "split"] != "test" else "train"
    other = leaked[leaked["patient"] == leaked.loc[leaked.index[0], "patient"]]
    if len(other) > 1:
        with pytest.raises(OncoFMError, match="more than one split"):
            check_split(leaked)
    bad = pd.concat([split, split.iloc[:1].assign(split="test" if split.iloc[0]["split"] != "test" else "val")])
    with pytest.raises(OncoFMError, match="more than one split"):
        check_split(bad)


def test_compare_findings_pools_counts_and_gives_ratios() -> None:
    area = 224 * 224 * (0.5e-3) ** 2  # mm² of a 224 px patch at 0.5 µm/px
    top = [CellFindings.from_counts({"inflammatory": 30, "epithelial": 10, "stromal": 0}, area)]
    rest = [CellFindings.from_counts({"inflammatory": 0, "epithelial": 30, "stromal": 10}, area)] * 2
    cmp = compare_findings(top, top + rest)
    # slide: 30 inflammatory over 3 patch areas; top: 30 over 1 -> 3x
    assert cmp["inflammatory_density"].ratio == pytest.approx(3.0)
    assert cmp["inflammatory_density"].top == pytest.approx(30 / area)
    assert cmp["epithelial_fraction"].top == pytest.approx(0.25)
    assert cmp["epithelial_fraction"].slide == pytest.approx(70 / 120)  # 30 + 70 + 20 cells
    assert cmp["stromal_fraction"].top == 0.0 and cmp["stromal_fraction"].ratio == 0.0
    empty = [CellFindings.from_counts({c: 0 for c in CLASSES}, area)]
    assert compare_findings(empty, empty)["epithelial_fraction"].ratio is None  # no cells: no ratio
    with pytest.raises(OncoFMError, match="at least one patch"):
        compare_findings([], top)


def test_real_brca_m2c_image_smoke(shared_data, tmp_path) -> None:
    """One real region: LoG candidates reach the annotated cells; a quickly fitted model gives findings."""
    data = shared_data / "pathology" / "brca_m2c_tcga_rois"
    [a] = load_images(data, ["TCGA-A8-A06N-01Z-00-DX1_18501_28501_1000_1000_0.93.png"])
    assert a.image.dtype == np.uint8 and a.image.shape[2] == 3 and len(a.points) > 100
    found = nucleus_candidates(a.image, threshold=0.12)
    _, gi = match_points(found, a.points, radius=12.0)
    assert len(gi) / len(a.points) > 0.9  # the candidates reach > 90% of the annotated cells within 6 µm

    half = AnnotatedImage(a.file, a.patient, a.image[:, :240], a.points[a.points[:, 0] < 240],
                          a.labels[a.points[:, 0] < 240])
    other = AnnotatedImage(a.file, a.patient, a.image[:, 240:], a.points[a.points[:, 0] >= 240] - [240, 0],
                           a.labels[a.points[:, 0] >= 240])
    design = design_class("log-gbm").fit([half], [other], _tiny_settings(tmp_path), tmp_path / "w")
    model = CellModel(design, [0.3, 0.3, 0.3])
    patches = [a.image[:224, :224], a.image[224:448, 224:448]]
    f = cell_findings(model, patches, mpp=0.5)
    assert len(f) == 2
    area = 224 * 224 * 0.25e-6
    for x in f:
        assert x.area_mm2 == pytest.approx(area)
        assert x.n_cells > 10  # a cellular region
        assert x.densities_per_mm2["all"] == pytest.approx(x.n_cells / area)
        assert sum(x.fractions.values()) == pytest.approx(1.0)
    # the same patches at 0.25 µm/px are resampled to the model's 0.5 µm/px: a quarter of the area
    f_fine = cell_findings(model, patches, mpp=0.25)
    assert f_fine[0].area_mm2 == pytest.approx(area / 4)
    with pytest.raises(OncoFMError, match="RGB uint8"):
        cell_findings(model, [a.image[:64, :64].astype(float)], mpp=0.5)


def test_cells_cli_is_registered() -> None:
    from typer.testing import CliRunner

    from oncofm.cli import app

    result = CliRunner().invoke(app, ["cells", "--help"])
    assert result.exit_code == 0
    assert "train" in result.output and "evaluate" in result.output


def test_stage_trains_on_a_tiny_folder_then_skips_and_evaluates_the_test_patients(tmp_path) -> None:
    """The stage end to end on a BRCA-M2C-shaped folder of planted images: split.csv by patient, both
    designs compared on validation, a second call skips, a changed setting stops naming it, evaluate scores
    the test images only."""
    from PIL import Image

    from oncofm.pathology.cells.train import evaluate_cells, read_split, train_cells

    data = tmp_path / "data"
    data.mkdir()
    rows, cells = [], []
    for i in range(10):
        a = planted(10 + i)
        Image.fromarray(a.image).save(data / a.file)
        rows.append({"file": a.file, "patient_barcode": f"P{i // 2}", "width": 96, "height": 96})
        cells += [{"file": a.file, "x": x, "y": y, "cell_class": CLASSES[k]} for (x, y), k in zip(a.points, a.labels,
                                                                                                 strict=True)]
    pd.DataFrame(rows).to_csv(data / "MANIFEST.csv", index=False)
    pd.DataFrame(cells).to_csv(data / "cells.csv.gz", index=False)
    settings = _tiny_settings(tmp_path).model_copy(update={"data": str(data), "out": str(tmp_path / "m"),
                                                           "val_fraction": 0.2, "test_fraction": 0.2})
    paths = train_cells(settings)
    split = read_split(paths["model"])
    assert split.groupby("patient")["split"].nunique().max() == 1
    assert set(split["split"]) == {"train", "val", "test"}
    chosen = CellModel.load(paths["model"])
    assert chosen.design_name in {"log-gbm", "unet"}
    mtime = (paths["model"] / "config.yaml").stat().st_mtime_ns
    train_cells(settings)  # same settings: skipped
    assert (paths["model"] / "config.yaml").stat().st_mtime_ns == mtime
    with pytest.raises(OncoFMError, match="seed: 0 -> 1"):
        train_cells(settings.model_copy(update={"seed": 1}))
    result = evaluate_cells(paths["model"])
    test_files = set(split.loc[split["split"] == "test", "file"])
    assert result["n_images"] == len(test_files) == 2
    assert 0.0 <= result["scores"]["macro_f1"] <= 1.0
    assert (paths["model"] / "test_metrics.json").exists()
