"""A config without add_ohem_config: the error names the missing call, for each component."""

import pytest
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from helpers import DEVICE

import ohem_d2  # noqa: F401  (registers the components)
from ohem_d2.config import MissingOHEMConfigError, add_ohem_config


def _plain_cfg(**model):
    cfg = get_cfg()  # no add_ohem_config: what a user's own script may forget
    cfg.MODEL.DEVICE = DEVICE
    cfg.MODEL.ROI_HEADS.NAME = model.get("head", "StandardROIHeads")
    cfg.MODEL.BACKBONE.NAME = model.get("backbone", "build_resnet_backbone")
    cfg.MODEL.ROI_BOX_HEAD.NAME = model.get("box_head", "FastRCNNConvFCHead")
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    return cfg


@pytest.mark.parametrize(
    "parts, node",
    [
        ({"head": "OHEMROIHeads"}, "MODEL.ROI_HEADS.OHEM"),
        ({"backbone": "build_vgg_backbone"}, "MODEL.VGG"),
    ],
)
def test_missing_add_ohem_config_names_the_call(parts, node):
    with pytest.raises(MissingOHEMConfigError, match=rf"no {node}: call ohem_d2.add_ohem_config"):
        build_model(_plain_cfg(**parts))


def test_box_head_names_the_call_too_and_add_ohem_config_cures_all():
    from ohem_d2.modeling.box_head import VGGFCHead

    cfg = get_cfg()
    with pytest.raises(MissingOHEMConfigError, match="add_ohem_config"):
        VGGFCHead(cfg, ShapeSpec(channels=8, height=7, width=7))
    add_ohem_config(cfg)
    assert VGGFCHead(cfg, ShapeSpec(channels=8, height=7, width=7)).output_shape.channels == 4096
