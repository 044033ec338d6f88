"""VGG backbones of the paper: VGG16 and VGG_CNN_M_1024 ("VGGM"), one output at stride 16."""

import torch.nn as nn
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..config import require_ohem_config

# Per conv block: list of (out_channels, kernel, stride, padding) and the pooling that ends
# the block (kernel, stride) or None. VGG16's pool5 is removed (conv5_3 at stride 16);
# Caffe pools round up, hence ceil_mode below.
_VGG16_BLOCKS = [
    ([(64, 3, 1, 1)] * 2, (2, 2)),
    ([(128, 3, 1, 1)] * 2, (2, 2)),
    ([(256, 3, 1, 1)] * 3, (2, 2)),
    ([(512, 3, 1, 1)] * 3, (2, 2)),
    ([(512, 3, 1, 1)] * 3, None),
]
# VGG_CNN_M_1024 (Chatfield et al. 2014) as in the Fast R-CNN release.
_VGGM_BLOCKS = [
    ([(96, 7, 2, 0)], (3, 2)),
    ([(256, 5, 2, 1)], (3, 2)),
    ([(512, 3, 1, 1)], None),
    ([(512, 3, 1, 1)], None),
    ([(512, 3, 1, 1)], None),
]
VGG_ARCHS = {"VGG16": _VGG16_BLOCKS, "VGG_CNN_M_1024": _VGGM_BLOCKS}


class VGG(Backbone):
    """VGG conv layers named as in the Caffe models (conv1_1 ... conv5_3, or conv1 ... conv5).

    Output: {"conv5": Tensor (N, C5, H/16, W/16)}.
    """

    def __init__(self, arch="VGG16", width_mult=1.0, freeze_at=2, norm=""):
        """
        Args:
            arch: "VGG16" or "VGG_CNN_M_1024".
            width_mult: multiplies every layer's channel count (>0); 1.0 is the paper's net.
            freeze_at: number of leading conv blocks whose parameters are frozen
                (paper: 2 for VGG16, conv1_x and conv2_x; 1 for VGGM).
            norm: "" (the paper's VGG: none) or a Detectron2 norm name ("BN", "GN",
                "SyncBN", ...) after every conv; lets narrow nets train from scratch.
        """
        super().__init__()
        if arch not in VGG_ARCHS:
            raise ValueError(f"MODEL.VGG.ARCH={arch!r}; expected one of {sorted(VGG_ARCHS)}")
        if width_mult <= 0:
            raise ValueError(f"MODEL.VGG.WIDTH_MULT must be > 0, got {width_mult}")
        blocks = VGG_ARCHS[arch]
        if not 0 <= freeze_at <= len(blocks):
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at} out of [0, {len(blocks)}]")
        self.arch = arch
        self.stage_names = []
        in_channels = 3
        for b, (convs, pool) in enumerate(blocks, start=1):
            stage = nn.Sequential()
            for i, (out, k, s, p) in enumerate(convs, start=1):
                out = max(1, int(round(out * width_mult)))
                name = f"conv{b}_{i}" if len(convs) > 1 else f"conv{b}"
                stage.add_module(
                    name, nn.Conv2d(in_channels, out, k, stride=s, padding=p, bias=not norm)
                )
                if norm:
                    stage.add_module(f"{name}_norm", get_norm(norm, out))
                stage.add_module(f"relu{name[4:]}", nn.ReLU(inplace=True))
                if arch == "VGG_CNN_M_1024" and b <= 2:
                    # Caffe LRN: local_size 5, alpha 5e-4, beta 0.75, k 2 (same formula).
                    stage.add_module(f"norm{b}", nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0))
                in_channels = out
            if pool is not None:
                stage.add_module(f"pool{b}", nn.MaxPool2d(pool[0], pool[1], ceil_mode=True))
            self.add_module(f"conv{b}", stage)
            self.stage_names.append(f"conv{b}")
        self._out_channels = in_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # Caffe's "gaussian std 0.01" style init would not train a deep VGG from
                # scratch; He init keeps random-init nets (tests, demos) trainable.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for name in self.stage_names[:freeze_at]:
            stage = getattr(self, name)
            for p in stage.parameters():
                p.requires_grad_(False)
            # Frozen blocks keep their normalisation statistics too.
            setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(stage))

    def forward(self, x):
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return {"conv5": x}

    def output_shape(self):
        return {"conv5": ShapeSpec(channels=self._out_channels, stride=16)}

    @property
    def size_divisibility(self):
        return 0


@BACKBONE_REGISTRY.register()
def build_vgg_backbone(cfg, input_shape):
    """Build the VGG backbone named by MODEL.VGG.ARCH. `input_shape` must have 3 channels."""
    if input_shape.channels != 3:
        raise ValueError(f"VGG expects 3 input channels, got {input_shape.channels}")
    require_ohem_config(cfg, "MODEL.VGG")
    return VGG(
        arch=cfg.MODEL.VGG.ARCH,
        width_mult=cfg.MODEL.VGG.WIDTH_MULT,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        norm=cfg.MODEL.VGG.NORM,
    )
