import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from helpers import DEVICE

import ohem_d2
from ohem_d2.convert_weights import convert


def test_converted_vgg16_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.vgg16().eval()  # random init: no download
    src, out = tmp_path / "vgg16.pth", tmp_path / "vgg16_d2.pth"
    torch.save(tv.state_dict(), src)
    convert(str(src), str(out))

    cfg = get_cfg()
    ohem_d2.add_ohem_config(cfg)
    cfg.merge_from_file("configs/frcn_vgg16.yaml")
    cfg.MODEL.DEVICE = DEVICE
    model = build_model(cfg).eval()
    # The file this project writes loads with weights_only=True (no code in it).
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    assert set(checkpoint["model"]) <= set(model.state_dict())
    DetectionCheckpointer(model).load(str(out))

    # Both networks on the one device: the same kernels, so the same tolerance anywhere.
    tv.to(DEVICE)
    x = torch.rand(1, 3, 224, 224).to(DEVICE)
    with torch.no_grad():
        ours = model.backbone(x)["conv5"]
        theirs = tv.features[:30](x)  # up to relu5_3, before pool5
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        pooled = torch.rand(3, 512, 7, 7).to(DEVICE)
        torch.testing.assert_close(
            model.roi_heads.box_head(pooled), tv.classifier[:5](pooled.flatten(1))
        )
