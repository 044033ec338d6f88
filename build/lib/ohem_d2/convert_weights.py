"""Convert torchvision's ImageNet VGG16 checkpoint into a Detectron2 checkpoint for ohem-d2.

    python -m ohem_d2.convert_weights --src vgg16-397923af.pth --out vgg16_d2.pth

The result holds the 13 conv layers (backbone.convB.convB_I) and fc6/fc7
(roi_heads.box_head.fc6/fc7); the ImageNet classifier (fc8) is dropped. Use it with
    MODEL.WEIGHTS vgg16_d2.pth  INPUT.FORMAT RGB
    MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]  MODEL.PIXEL_STD [58.395, 57.12, 57.375]
(torchvision's normalisation in 0-255 units, the defaults of configs/Base-FastRCNN-VGG16.yaml).
"""

import argparse
import os

import torch

# torchvision's vgg16: `features` indices of the 13 convs, in order.
_TV_VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
_VGG16_BLOCK_SIZES = [2, 2, 3, 3, 3]
# torchvision's classifier: Linear(25088, 4096), ReLU, Dropout, Linear(4096, 4096), ...
_TV_FC = {"fc6": "classifier.0", "fc7": "classifier.3"}

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def torchvision_vgg16_to_d2(state_dict):
    """Map a torchvision `vgg16().state_dict()` to ohem-d2 parameter names.

    Returns: dict name -> tensor. Raises KeyError naming the first missing key and
    ValueError for a state dict of another network (wrong number of conv layers or shape).
    """
    names = []
    for block, size in enumerate(_VGG16_BLOCK_SIZES, start=1):
        names += [f"backbone.conv{block}.conv{block}_{i}" for i in range(1, size + 1)]
    tv_convs = sorted(
        {int(k.split(".")[1]) for k in state_dict if k.startswith("features.")},
    )
    if tv_convs != _TV_VGG16_CONVS:
        raise ValueError(
            f"Not a torchvision VGG16 state dict: conv layers at features.{tv_convs}, "
            f"expected features.{_TV_VGG16_CONVS} (vgg16_bn and other VGGs are not supported)"
        )
    out = {}
    for tv_index, name in zip(_TV_VGG16_CONVS, names):
        for p in ("weight", "bias"):
            out[f"{name}.{p}"] = state_dict[f"features.{tv_index}.{p}"]
    for ours, theirs in _TV_FC.items():
        for p in ("weight", "bias"):
            out[f"roi_heads.box_head.{ours}.{p}"] = state_dict[f"{theirs}.{p}"]
    if out["roi_heads.box_head.fc6.weight"].shape[1] != 512 * 7 * 7:
        raise ValueError("fc6 of the source does not take 512x7x7 inputs: not VGG16")
    return out


def convert(src, out):
    """Read torchvision's checkpoint `src` (weights only) and write a Detectron2 checkpoint."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = {k: v.clone() for k, v in torchvision_vgg16_to_d2(state).items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # Only tensors and plain containers: loadable with torch.load(weights_only=True).
    torch.save({"model": model, "__author__": "torchvision (converted by ohem_d2)"}, out)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="torchvision vgg16 checkpoint (.pth)")
    parser.add_argument("--out", required=True, help="Detectron2 checkpoint to write (.pth)")
    args = parser.parse_args(argv)
    model = convert(args.src, args.out)
    print(f"wrote {len(model)} tensors to {args.out}")
    print(f"use: MODEL.WEIGHTS {args.out} INPUT.FORMAT RGB")
    print(f"     MODEL.PIXEL_MEAN {PIXEL_MEAN} MODEL.PIXEL_STD {PIXEL_STD}")


if __name__ == "__main__":
    main()
