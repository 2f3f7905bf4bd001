"""Metrics: image similarity (PSNR, SSIM, MS-SSIM, MAE, MSE, NMSE), relative sharpness, label overlap (Dice,
HD95), and the evaluation conventions of ``phmdiff eval`` (:mod:`phmdiff_cli.metrics.evaluate`)."""

from __future__ import annotations

from phmdiff_cli.metrics.image import mae, ms_ssim, mse, nmse, psnr, sharpness, ssim
from phmdiff_cli.metrics.segmentation import dice, hausdorff_distance, hd95, label_values

__all__ = [
    "mae",
    "mse",
    "nmse",
    "psnr",
    "ssim",
    "ms_ssim",
    "sharpness",
    "dice",
    "hausdorff_distance",
    "hd95",
    "label_values",
]
