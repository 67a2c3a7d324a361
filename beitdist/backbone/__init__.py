"""The BEiT encoder: config, layers, model, checkpoint conversion and resampling."""

from beitdist.backbone.beit import BackboneOutput, Beit, InputError
from beitdist.backbone.config import VARIANTS, BackboneConfig, ConfigError, variant

__all__ = ["VARIANTS", "BackboneConfig", "BackboneOutput", "Beit", "ConfigError", "InputError", "variant"]
