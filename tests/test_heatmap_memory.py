"""Heatmaps: overlapping patches averaged, background clear, and bounded memory for a 100,000² slide."""

from __future__ import annotations

import tracemalloc

import numpy as np

from oncofm.pathology.heatmap import HeatmapSettings, draw_heatmap, normalise_scores, overlay, score_grid


class HugeSlide:
    """A 100,000 x 100,000 slide as the heatmap sees it: dimensions and a thumbnail (from a pyramid level).

    A full-resolution RGB array of it would take 30 GB; the heatmap must never make one.
    """

    dimensions = (100_000, 100_000)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        rng = np.random.default_rng(0)
        img = np.full((max_size, max_size, 3), 245, np.uint8)
        img[max_size // 8: -max_size // 8, max_size // 8: -max_size // 8] = rng.integers(
            120, 220, size=(max_size - 2 * (max_size // 8),) * 2 + (3,), dtype=np.uint8)
        return img


def test_overlapping_patches_are_averaged_and_background_is_nan() -> None:
    coords = np.array([[0, 0], [50, 0]])  # two 100-px patches overlapping over x in [50, 100)
    grid = score_grid(coords, np.array([0.0, 1.0]), 100, (400, 50), (1, 8))  # 1 x 8 grid, 50 px per cell
    np.testing.assert_allclose(grid[0, :3], [0.0, 0.5, 1.0])
    assert np.isnan(grid[0, 3:]).all()


def test_percentile_normalisation_and_clear_background() -> None:
    values = np.array([[0.0, 1.0, 2.0, 100.0, np.nan]])
    out = normalise_scores(values, 0, 75)  # 75th percentile of the finite values: 26.5
    assert out[0, 3] == 1.0 and out[0, 0] == 0.0 and np.isnan(out[0, 4])
    thumb = np.full((1, 5, 3), 200, np.uint8)
    blended = overlay(thumb, out, alpha=0.5)
    np.testing.assert_array_equal(blended[0, 4], thumb[0, 4])  # no patch: the thumbnail shows through
    assert not np.array_equal(blended[0, 3], thumb[0, 3])


def test_heatmap_of_a_100k_slide_stays_under_the_memory_bound(tmp_path) -> None:
    patch = 256  # level-0 pixels
    side = np.arange(12_500, 87_500, patch)
    xs, ys = np.meshgrid(side, side)
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)  # 85,849 tissue patches
    rng = np.random.default_rng(1)
    scores = rng.random(len(coords))
    scores /= scores.sum()
    settings = HeatmapSettings(thumb_size=1024, blur=1.0)
    tracemalloc.start()
    png = draw_heatmap(HugeSlide(), coords, scores, patch, tmp_path / "huge.png", settings, title="100k")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert png.exists() and png.stat().st_size > 10_000
    # bound: a few thumbnail-sized float arrays and the figure (1024² x 8 B = 8 MB each); full resolution
    # would be 30 GB, and even one full-resolution float mask 40 GB
    assert peak < 250 * 2**20, f"peak traced memory {peak / 2**20:.0f} MiB"
