"""An example third-party beitdist plugin: the `linear_probe` head (BEiT's linear evaluation)."""

from beitdist_example_head.head import LinearProbeHead, LinearProbeOptions

__version__ = "0.1.0"

__all__ = ["LinearProbeHead", "LinearProbeOptions"]
