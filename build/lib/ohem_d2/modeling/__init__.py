# Importing these modules registers their components in Detectron2's registries.
from .box_head import VGGFCHead
from .meta_arch import FastRCNN
from .ohem import OHEMCascadeROIHeads, OHEMRes5ROIHeads, OHEMROIHeads
from .proposal_generator import SelectiveSearchProposals
from .vgg import VGG, build_vgg_backbone

__all__ = [
    "VGG",
    "FastRCNN",
    "OHEMCascadeROIHeads",
    "OHEMROIHeads",
    "OHEMRes5ROIHeads",
    "SelectiveSearchProposals",
    "VGGFCHead",
    "build_vgg_backbone",
]
