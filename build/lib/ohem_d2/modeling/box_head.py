"""VGG's fc6/fc7 as a Detectron2 box head."""

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn as nn
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_BOX_HEAD_REGISTRY

from ..config import require_ohem_config


@ROI_BOX_HEAD_REGISTRY.register()
class VGGFCHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout, on RoI-pooled features.

    Input: (R, C, P, P) pooled features; output: (R, fc_dims[-1]).
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, fc_dims, dropout=0.5):
        """
        Args:
            input_shape: shape of the pooled features (channels, height, width).
            fc_dims: output sizes of fc6, fc7, ... (paper: 4096, 4096 for VGG16).
            dropout: dropout probability after each fc (paper: 0.5).
        """
        super().__init__()
        if not fc_dims:
            raise ValueError("VGGFCHead needs at least one fc layer (MODEL.VGG.FC_DIMS)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MODEL.ROI_BOX_HEAD.DROPOUT must be in [0, 1), got {dropout}")
        in_dim = input_shape.channels * (input_shape.height or 1) * (input_shape.width or 1)
        self.fc_names = []
        for i, out_dim in enumerate(fc_dims, start=6):
            fc = nn.Linear(in_dim, out_dim)
            # Same init as Detectron2's FastRCNNConvFCHead; ImageNet weights replace it.
            weight_init.c2_xavier_fill(fc)
            self.add_module(f"fc{i}", fc)
            self.add_module(f"relu{i}", nn.ReLU(inplace=True))
            self.add_module(f"drop{i}", nn.Dropout(dropout))
            self.fc_names.append(f"fc{i}")
            in_dim = out_dim
        self._output_size = in_dim

    @classmethod
    def from_config(cls, cfg, input_shape):
        require_ohem_config(cfg, "MODEL.VGG")
        return {
            "input_shape": input_shape,
            "fc_dims": list(cfg.MODEL.VGG.FC_DIMS),
            "dropout": cfg.MODEL.ROI_BOX_HEAD.DROPOUT,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, start_dim=1)
        for i in range(6, 6 + len(self.fc_names)):
            x = getattr(self, f"drop{i}")(getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x)))
        return x

    @property
    def output_shape(self):
        return ShapeSpec(channels=self._output_size)
