import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

import ohem_d2
from ohem_d2.modeling.box_head import VGGFCHead
from ohem_d2.modeling.vgg import VGG


def _cfg(**vgg):
    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_vgg_backbone"
    for k, v in vgg.items():
        cfg.MODEL.VGG[k] = v
    return cfg


@pytest.mark.parametrize("arch", ["VGG16", "VGG_CNN_M_1024"])
def test_output_is_conv5_at_stride_16(arch):
    backbone = build_backbone(_cfg(ARCH=arch, WIDTH_MULT=0.125))
    shape = backbone.output_shape()["conv5"]
    assert shape.stride == 16 and shape.channels == 64
    out = backbone(torch.zeros(1, 3, 224, 320))["conv5"]
    # Caffe-style ceil pooling: ceil(224/16)=14, 320/16=20 for VGG16.
    assert out.shape[1] == 64
    assert abs(out.shape[2] - 224 / 16) <= 1 and abs(out.shape[3] - 320 / 16) <= 1


def test_vgg16_layers_match_the_paper():
    vgg = VGG("VGG16")
    convs = [m for m in vgg.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    assert [c.out_channels for c in convs] == [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in vgg.modules()) == 4  # no pool5


def test_vggm_layers_match_the_paper():
    vgg = VGG("VGG_CNN_M_1024", freeze_at=1)
    convs = [m for m in vgg.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (96, 7, 2),
        (256, 5, 2),
        (512, 3, 1),
        (512, 3, 1),
        (512, 3, 1),
    ]
    lrns = [m for m in vgg.modules() if isinstance(m, torch.nn.LocalResponseNorm)]
    assert len(lrns) == 2 and lrns[0].size == 5 and lrns[0].alpha == 5e-4
    assert not any(p.requires_grad for p in vgg.conv1.parameters())
    assert all(p.requires_grad for p in vgg.conv2.parameters())


def test_freeze_at_freezes_leading_blocks_only():
    vgg = VGG("VGG16", width_mult=0.125, freeze_at=2)
    for name in vgg.stage_names:
        grads = {p.requires_grad for p in getattr(vgg, name).parameters()}
        assert grads == ({False} if name in ("conv1", "conv2") else {True})
    # frozen layers receive no gradient, the others do
    vgg(torch.rand(1, 3, 64, 64))["conv5"].sum().backward()
    assert vgg.conv1.conv1_1.weight.grad is None
    assert vgg.conv3.conv3_1.weight.grad is not None


def test_bad_arch_and_width_are_refused():
    with pytest.raises(ValueError, match="MODEL.VGG.ARCH"):
        VGG("VGG19")
    with pytest.raises(ValueError, match="WIDTH_MULT"):
        VGG("VGG16", width_mult=0)


def test_fc_head_shapes_and_dropout():
    head = VGGFCHead(ShapeSpec(channels=8, height=7, width=7), fc_dims=[32, 16], dropout=0.5)
    assert head.output_shape.channels == 16
    x = torch.rand(5, 8, 7, 7)
    assert head(x).shape == (5, 16)
    head.eval()
    assert torch.equal(head(x), head(x))  # deterministic at test time
    head.train()
    torch.manual_seed(0)
    a = head(x)
    torch.manual_seed(1)
    assert not torch.equal(a, head(x))  # dropout active in training


def test_optional_norm_follows_every_conv_and_freezes_with_its_block():
    from detectron2.layers import FrozenBatchNorm2d

    vgg = VGG("VGG16", width_mult=0.125, freeze_at=1, norm="BN")
    convs = [m for m in vgg.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is None for c in convs)  # the norm's shift replaces the bias
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in vgg.conv1.modules()) == 2
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules()) == 11
    assert VGG("VGG16", width_mult=0.125).conv1.conv1_1.bias is not None  # paper: no norm
