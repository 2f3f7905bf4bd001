"""The sources' fine detail added to a synthesized volume, in the proportion the volume itself follows them.

A regression predicts the conditional mean of the target: its edges are blurred where the source -> target
mapping is uncertain (brain-sharp's synthetic T2 of OMS-MNI-p19 has 0.77 of the real T2's in-plane gradient). The
sources hold the anatomy at full resolution. In a window around each voxel the synthesized volume ``p`` is fitted
as a linear function of the sources, ``p ~ a . I + b`` (the local model of the guided filter, He et al., "Guided
Image Filtering", TPAMI 2013); each source's fine detail, ``I`` minus its local box mean, is then added to ``p``
scaled by ``a``. An edge of the T1 becomes an edge of the synthetic T2 with the sign and contrast the prediction's
own local T1 -> T2 relation gives it; where the prediction does not follow a source (``a`` ~ 0, e.g. a lesion
the source does not show) nothing is added, and a flat source adds nothing.

It is meant for a blurred output: one that already carries a source's detail gets it a second time (brain-sharp's
T2 of TCGA-DU-7294 from three sources, as sharp as the real T2 without it, overshoots to 1.24), so each model's card
says whether it runs (``sampling.source_detail``). Measured with brain-sharp on the four validation subjects
(benchmarks/README.md, "The sources' detail"): SSIM up on all ten pairs, T1 -> T2 +0.022 SSIM and +0.1 dB,
sharpness 0.85 -> 0.94 of the real T2's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = ["DETAIL_RADIUS", "FIT_RADIUS", "FIT_EPS", "add_source_detail"]

#: Half-width (voxels) of the box whose mean is taken from a source to leave its fine detail: 3 x 3 x 3 at 1 mm.
DETAIL_RADIUS = 1
#: Half-width (voxels) of the window the local linear fit of the prediction on the sources uses: 5 x 5 x 5.
FIT_RADIUS = 2
#: Ridge added to the sources' local covariance (model range squared, i.e. a std of 0.1 = 5 % of the range):
#: where a source is flat the slope goes to 0 instead of amplifying noise.
FIT_EPS = 1e-2


def _box(volume: np.ndarray, radius: int) -> np.ndarray:
    return ndimage.uniform_filter(volume, size=2 * radius + 1, mode="nearest")


def add_source_detail(mean: np.ndarray, sources: Sequence[np.ndarray], detail_radius: int = DETAIL_RADIUS,
                      fit_radius: int = FIT_RADIUS, eps: float = FIT_EPS) -> np.ndarray:
    """``mean`` plus the sources' fine detail, each scaled by the local slope of ``mean`` on the sources.

    Args:
        mean: ``(Z, H, W)`` float32 synthesized volume in the model range [-1, 1], on the model grid.
        sources: K ``(Z, H, W)`` prepared sources on the same grid, model range (background -1).
        detail_radius, fit_radius: box half-widths in voxels (:data:`DETAIL_RADIUS`, :data:`FIT_RADIUS`).
        eps: ridge of the fit (:data:`FIT_EPS`).

    Returns:
        ``(Z, H, W)`` float32, clipped to [-1, 1].
    """
    p = np.asarray(mean, dtype=np.float32)
    guides = [np.asarray(s, dtype=np.float32) for s in sources]
    detail = [g - _box(g, detail_radius) for g in guides]
    # Only where some source has detail (0 on its flat background): a third of a brain's field of view.
    where = np.logical_or.reduce([d != 0 for d in detail])
    k, n = len(guides), int(where.sum())
    mean_p = _box(p, fit_radius)
    mean_i = [_box(g, fit_radius) for g in guides]
    cov = np.stack([(_box(g * p, fit_radius) - m * mean_p)[where] for g, m in zip(guides, mean_i, strict=True)], -1)
    var = np.empty((n, k, k), dtype=np.float32)  # the sources' local covariance at each voxel of ``where``
    for i in range(k):
        for j in range(i, k):
            var[:, i, j] = var[:, j, i] = (_box(guides[i] * guides[j], fit_radius) - mean_i[i] * mean_i[j])[where]
    var += np.float32(eps) * np.eye(k, dtype=np.float32)
    slope = torch.linalg.solve(torch.from_numpy(var), torch.from_numpy(cov)).numpy()  # (n, K)
    out = p.copy()
    out[where] += sum(slope[:, i] * d[where] for i, d in enumerate(detail))
    return np.clip(out, -1.0, 1.0).astype(np.float32)
