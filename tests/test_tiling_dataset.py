"""PatchDataset (lazy reads, DataLoader workers), Macenko stain normalisation, augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from oncofm.pathology.dataset import PatchAugment, PatchDataset
from oncofm.pathology.reader import open_slide
from oncofm.pathology.stain import REFERENCE_MAX_C, REFERENCE_STAINS, MacenkoNormalizer, estimate_stains
from oncofm.pathology.tiling import TilingSettings, tile_slides


@pytest.fixture(scope="module")
def cr7395_h5(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles")
    svs = shared_data / "pathology" / "tcga_cr7395_hnsc_svs" / "TCGA-CR-7395-01A-01-TS1_histolab-fixture.svs"
    res = tile_slides(TilingSettings(source=str(svs), out=str(out), slide_mpp=0.5, target_mpp=1.0, qc=False),
                      progress=False)
    return Path(res[0].paths["h5"])


def test_items_match_level_reads(cr7395_h5: Path) -> None:
    ds = PatchDataset(cr7395_h5)
    assert len(ds) > 10 and ds.patch_size == 224
    x = ds[3]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    # Read at level 1 (2x) with a 224 read size: the item equals the raw level-1 region (no resize needed).
    slide = open_slide(ds.grid.slide_path, mpp=0.5)
    cx, cy = ds.coords[3]
    raw = slide.read_region((int(cx), int(cy)), 1, (224, 224))
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy() * 255, raw, atol=0.51)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_pickles_without_handle_and_dataloader_workers(cr7395_h5: Path) -> None:
    ds = PatchDataset(cr7395_h5)
    _ = ds[0]
    assert ds._slide is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._slide is None
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    batches = [b for _, b in zip(range(2), loader, strict=False)]
    assert batches[0].shape == (8, 3, 224, 224)
    torch.testing.assert_close(batches[0][0], ds[0])


def test_augment_is_a_dihedral_transform_without_jitter() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 16, 16)
    aug = PatchAugment(brightness=0, contrast=0, saturation=0, hue=0)
    for _ in range(10):
        y = aug(x)
        variants = [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
        assert any(torch.equal(y, v) for v in variants)
    jitter = PatchAugment(flip=False, rotate=False, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)
    y = jitter(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)
    # Hue rotation keeps grey pixels grey.
    grey = torch.full((3, 4, 4), 0.5)
    torch.testing.assert_close(PatchAugment(flip=False, rotate=False, brightness=0, contrast=0, saturation=0,
                                            hue=0.3)(grey), grey)
    with pytest.raises(ValueError, match="brightness"):
        PatchAugment(brightness=1.5)


def _synthetic_he(stains: np.ndarray, rng: np.random.Generator, n: int = 64) -> np.ndarray:
    """An image made from two known stain OD vectors (natural-log OD, I0 = 240) with random concentrations."""
    c = np.zeros((n * n, 2))
    kind = rng.integers(0, 3, n * n)
    c[kind == 0, 0] = rng.uniform(0.3, 1.6, (kind == 0).sum())  # nuclei: mostly hematoxylin
    c[kind == 0, 1] = rng.uniform(0.0, 0.2, (kind == 0).sum())
    c[kind == 1, 1] = rng.uniform(0.3, 1.0, (kind == 1).sum())  # stroma: mostly eosin
    c[kind == 1, 0] = rng.uniform(0.0, 0.2, (kind == 1).sum())
    c[kind == 2] = rng.uniform(0.2, 0.8, ((kind == 2).sum(), 2))
    rgb = 240 * np.exp(-(c @ stains.T)) - 1
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8).reshape(n, n, 3)


def test_macenko_recovers_planted_stains_and_normalises() -> None:
    rng = np.random.default_rng(0)
    planted = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    planted /= np.linalg.norm(planted, axis=0)
    img = _synthetic_he(planted, rng)
    stains, _ = estimate_stains(img)
    cos = (stains * planted).sum(axis=0)
    assert cos.min() > 0.99, cos
    # An image stained with the reference vectors is (nearly) unchanged by normalisation.
    ref = REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=0)
    ref_img = _synthetic_he(ref, rng)
    out = MacenkoNormalizer().transform(ref_img)
    assert np.abs(out.astype(int) - ref_img.astype(int)).mean() < 12
    # Normalising the planted image moves its stain vectors onto the reference's.
    normed = MacenkoNormalizer().transform(img)
    stains_after, max_c = estimate_stains(normed)
    assert ((stains_after * ref).sum(axis=0)).min() > 0.98
    assert max_c == pytest.approx(REFERENCE_MAX_C, rel=0.15)
    # Blank patches pass through unchanged.
    blank = np.full((32, 32, 3), 240, np.uint8)
    assert np.array_equal(MacenkoNormalizer().transform(blank), blank)


def test_dataset_with_stain_normalisation_and_augmentation(cr7395_h5: Path) -> None:
    ds = PatchDataset(cr7395_h5, stain_normalizer=True, augment=True, transform=lambda t: t * 2 - 1)
    x = ds[0]
    assert x.shape == (3, 224, 224) and x.min() >= -1 and x.max() <= 1
