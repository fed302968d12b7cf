"""DICOM whole-slide images beyond OpenSlide: the real Camelyon DICOM read by the pydicom reader, and DICOM
written here from the real TCGA-CR-7395 slide in the variants scanners and converters produce (no ImageType,
frames in column order, several instances per level, no pixel spacing), plus one clear error per cause."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid

from oncofm.errors import OncoFMError
from oncofm.pathology.reader import DicomReader, OpenSlideReader, find_slides, open_slide, slide_stem

PATHO = "pathology"
WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
VOLUME = ("ORIGINAL", "PRIMARY", "VOLUME", "NONE")
TILE = 256


def write_dicom_level(path: Path, rgb: np.ndarray, *, series: str, study: str, order: str = "row",
                      image_type: tuple[str, ...] | None = VOLUME, spacing_mm: float | None = 0.002,
                      codec: str = "jpeg", frames: list[int] | None = None, sop_class: str = WSI,
                      transfer_syntax: str | None = None) -> Path:
    """One DICOM VL WSI instance of ``rgb`` in 256-px frames: ``order`` row (TILED_FULL) or column
    (TILED_SPARSE with per-frame positions); ``frames``: only these frames of that order (a partial instance)."""
    h, w = rgb.shape[:2]
    across, down = -(-w // TILE), -(-h // TILE)
    grid = ([(c, r) for r in range(down) for c in range(across)] if order == "row"
            else [(c, r) for c in range(across) for r in range(down)])
    grid = [grid[i] for i in frames] if frames is not None else grid
    tiles = []
    for c, r in grid:
        t = np.full((TILE, TILE, 3), 255, np.uint8)
        part = rgb[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
        t[:part.shape[0], :part.shape[1]] = part
        tiles.append(t)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or (JPEGBaseline8Bit if codec == "jpeg" else ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "SM"
    if image_type is not None:
        ds.ImageType = list(image_type)
    ds.Rows = ds.Columns = TILE
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.NumberOfFrames = len(tiles)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422" if codec == "jpeg" else "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    shared = Dataset()
    if spacing_mm is not None:
        measures = Dataset()
        measures.PixelSpacing = [spacing_mm, spacing_mm]
        shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    if order == "row" and frames is None:
        ds.DimensionOrganizationType = "TILED_FULL"
    else:
        ds.DimensionOrganizationType = "TILED_SPARSE"
        groups = []
        for c, r in grid:
            group, plane = Dataset(), Dataset()
            plane.ColumnPositionInTotalImagePixelMatrix = c * TILE + 1
            plane.RowPositionInTotalImagePixelMatrix = r * TILE + 1
            group.PlanePositionSlideSequence = Sequence([plane])
            groups.append(group)
        ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    if codec == "jpeg":
        encoded = []
        for t in tiles:
            buf = io.BytesIO()
            Image.fromarray(t).save(buf, format="JPEG", quality=95)
            encoded.append(buf.getvalue())
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = np.stack(tiles).tobytes()
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def tcga_levels(shared_data: Path) -> list[np.ndarray]:
    """The real TCGA-CR-7395 H&E section at its level 1 (2221 x 1783) and half that."""
    svs = shared_data / PATHO / "tcga_cr7395_hnsc_svs" / "TCGA-CR-7395-01A-01-TS1_histolab-fixture.svs"
    with open_slide(svs, mpp=1.0) as s:
        base = s.read_region((0, 0), 1, s.level_dimensions[1])
    half = np.asarray(Image.fromarray(base).resize((base.shape[1] // 2, base.shape[0] // 2), Image.BILINEAR))
    return [base, half]


@pytest.fixture(scope="module")
def issue_slide(tcga_levels: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's case: the real TCGA slide as DICOM without ImageType, frames in column order, one file per
    level, in its own folder."""
    folder = tmp_path_factory.mktemp("dicom") / "TCGA-CR-7395-01A-01-TS1"
    folder.mkdir()
    series, study = generate_uid(), generate_uid()
    for i, rgb in enumerate(tcga_levels):
        write_dicom_level(folder / f"level{i}.dcm", rgb, series=series, study=study, order="column",
                          image_type=None, spacing_mm=0.002 * 2 ** i)
    return folder


def test_real_camelyon_dicom_reads_the_same_pixels_as_openslide(shared_data: Path) -> None:
    path = shared_data / PATHO / "camelyon_lowres_dicom" / "multiframe_camelyon_challenge_image.dcm"
    ours = open_slide(path, backend="dicom")
    ref = open_slide(path)
    assert isinstance(ours, DicomReader) and isinstance(ref, OpenSlideReader)
    assert ours.level_dimensions == ref.level_dimensions == ((1152, 700),)
    assert ours.mpp == pytest.approx(ref.mpp) and ours.mpp == pytest.approx(28.97, abs=0.01)
    np.testing.assert_array_equal(ours.read_region((0, 0), 0, (1152, 700)), ref.read_region((0, 0), 0, (1152, 700)))
    # a region over the slide's edge: white outside, as every backend
    edge = ours.read_region((1100, 650), 0, (100, 100))
    assert (edge[60:, :] == 255).all() and (edge[:, 60:] == 255).all()


def test_tcga_dicom_without_image_type_in_column_order(issue_slide: Path, tcga_levels: list[np.ndarray]) -> None:
    file0 = issue_slide / "level0.dcm"
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(file0))  # what the issue measured: OpenSlide refuses it
    for target in (issue_slide, file0):  # the folder, or any one of its files (the series is gathered)
        with open_slide(target) as slide:
            assert isinstance(slide, DicomReader)
            assert slide.level_dimensions == ((2221, 1783), (1110, 891))
            assert slide.level_downsamples[1] == pytest.approx(2.0, abs=0.01)
            assert slide.mpp == pytest.approx(2.0)  # PixelSpacing 0.002 mm
            whole = slide.read_region((0, 0), 0, (2221, 1783)).astype(float)
            assert np.abs(whole - tcga_levels[0]).mean() < 3  # JPEG q95 of the same pixels
            # a region across four frames at level 1
            part = slide.read_region((401, 401), 1, (200, 150)).astype(float)  # level-1 (200, 200)
            assert np.abs(part - tcga_levels[1][200:350, 200:400]).mean() < 6  # tissue: more JPEG error
    assert slide_stem(issue_slide) == "TCGA-CR-7395-01A-01-TS1"


def test_several_instances_per_level_native(tcga_levels: list[np.ndarray], tmp_path: Path) -> None:
    base = tcga_levels[0][:1000, :1200]  # 5 x 4 frames
    series, study = generate_uid(), generate_uid()
    n = 20
    write_dicom_level(tmp_path / "a.dcm", base, series=series, study=study, order="column", codec="native",
                      frames=list(range(0, n, 2)))
    write_dicom_level(tmp_path / "b.dcm", base, series=series, study=study, order="column", codec="native",
                      frames=list(range(1, n, 2)))
    with open_slide(tmp_path / "a.dcm") as slide:
        assert isinstance(slide, DicomReader) and slide.level_count == 1
        assert slide.properties["dicom.instances"] == "2"
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (1200, 1000)), base)  # lossless: exact
    assert find_slides(tmp_path) == [tmp_path / "a.dcm"]  # one slide, listed once


def test_missing_pixel_spacing_needs_slide_mpp(tcga_levels: list[np.ndarray], tmp_path: Path) -> None:
    path = write_dicom_level(tmp_path / "nospacing.dcm", tcga_levels[1], series=generate_uid(),
                             study=generate_uid(), image_type=None, spacing_mm=None)
    with pytest.raises(OncoFMError, match="--slide-mpp"):
        open_slide(path)
    with open_slide(path, mpp=4.0) as slide:
        assert slide.mpp == 4.0 and slide.dimensions == (1110, 891)


def test_errors_say_corrupt_truncated_or_unsupported(issue_slide: Path, tcga_levels: list[np.ndarray],
                                                     tmp_path: Path) -> None:
    good = (issue_slide / "level1.dcm").read_bytes()

    def damaged(name: str, data: bytes) -> Path:  # each in its own folder: copies of one series would be gathered
        (tmp_path / name).mkdir()
        path = tmp_path / name / f"{name}.dcm"
        path.write_bytes(data)
        return path

    with pytest.raises(OncoFMError, match=r"truncated DICOM: fragment \d+ needs \d+ bytes"):
        open_slide(damaged("truncated", good[: int(len(good) * 0.6)]))
    with pytest.raises(OncoFMError, match="corrupt DICOM: not a DICOM file"):
        open_slide(damaged("scan", b"\x00" * 128 + b"NOPE" + b"garbage" * 100))
    # a damaged item tag inside the pixel data
    at = good.index(b"\xfe\xff\x00\xe0", good.index(b"\xe0\x7f\x10\x00") + 20)
    with pytest.raises(OncoFMError, match="corrupt DICOM: bad item tag"):
        open_slide(damaged("broken", good[:at] + b"\x12\x34\x56\x78" + good[at + 4:]))
    # a frame whose bytes are not JPEG: found when it is read, named by number
    first = good.index(b"\xff\xd8\xff")
    bad_frame = damaged("bad_frame", good[:first] + b"\x00" * 64 + good[first + 64:])
    with open_slide(bad_frame, backend="dicom") as slide, pytest.raises(OncoFMError, match="corrupt DICOM: frame 1 of"):
        slide.read_region((0, 0), 0, (10, 10))
    ct = write_dicom_level(tmp_path / "ct.dcm", tcga_levels[1][:256, :256], series=generate_uid(),
                           study=generate_uid(), sop_class="1.2.840.10008.5.1.4.1.1.2")
    with pytest.raises(OncoFMError, match=r"DICOM variant not supported: SOP class CT Image Storage"):
        open_slide(ct)
    rle = write_dicom_level(tmp_path / "rle.dcm", tcga_levels[1][:256, :256], series=generate_uid(),
                            study=generate_uid(), transfer_syntax=RLELossless)
    with pytest.raises(OncoFMError, match=r"DICOM variant not supported: transfer syntax RLE Lossless"):
        open_slide(rle)


def test_tile_cli_on_a_dicom_folder(issue_slide: Path, tmp_path: Path) -> None:
    import h5py
    from typer.testing import CliRunner

    from oncofm.cli import app

    slides = tmp_path / "slides"
    shutil.copytree(issue_slide, slides / issue_slide.name)
    assert find_slides(slides) == [slides / issue_slide.name]
    result = CliRunner().invoke(app, ["tile", str(slides), "--out", str(tmp_path / "tiles"), "--mpp", "8",
                                      "--size", "64", "--no-qc"])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "tiles" / f"{issue_slide.name}.h5") as f:
        assert f.attrs["backend"] == "dicom" and f.attrs["read_level"] == 1
        assert 10 < len(f["coords"]) < f.attrs["grid_cols"] * f.attrs["grid_rows"]
    assert "done" in result.output and issue_slide.name in result.output
    assert "grid cells kept" in result.output
    # the feature step reads the DICOM frames in DataLoader worker processes
    encoded = CliRunner().invoke(app, ["encode", str(tmp_path / "tiles"), "--out", str(tmp_path / "features"),
                                       "--encoder", "swin-cpu", "--workers", "2", "--batch-size", "8"])
    assert encoded.exit_code == 0, encoded.output
    assert f"done     {issue_slide.name}" in encoded.output and "2 reader processes" in encoded.output
    with h5py.File(tmp_path / "features" / f"{issue_slide.name}.h5") as f:
        assert f["features"].shape[0] == len(f["coords"]) > 10 and np.isfinite(f["features"][:]).all()
