"""ohem-d2: Online Hard Example Mining for Detectron2.

Importing the package registers its backbones, box head, proposal generator, meta
architecture and ROI heads in Detectron2's registries.
"""

from . import modeling  # noqa: F401  (registration)
from .config import add_ohem_config

__all__ = ["add_ohem_config"]
