"""An example third-party beitdist plugin: the `pixel_regression` head (masked pixel regression,
SimMIM / MAE style)."""

from beitdist_masked_pixels.head import PixelRegressionHead, PixelRegressionOptions, patchify, unpatchify

__version__ = "0.1.0"

__all__ = ["PixelRegressionHead", "PixelRegressionOptions", "patchify", "unpatchify"]
