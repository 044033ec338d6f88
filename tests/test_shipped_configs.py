"""Every shipped YAML config loads, and the M / B variants set what their names say."""

import glob
import os

import pytest
from detectron2.config import get_cfg
from helpers import REPO

from ohem_d2.config import add_ohem_config
from ohem_d2.model_zoo import merge_config_file

CONFIGS = sorted(
    os.path.relpath(p, os.path.join(REPO, "configs"))
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if "model_zoo" not in os.path.relpath(p, REPO)
)


def load(name):
    cfg = get_cfg()
    add_ohem_config(cfg)
    merge_config_file(cfg, os.path.join(REPO, "configs", name))
    return cfg


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads(name):
    load(name)


@pytest.mark.parametrize(
    "name", [n for n in CONFIGS if n.startswith("bells_and_whistles/")], ids=os.path.basename
)
def test_bells_and_whistles_variants(name):
    cfg = load(name)
    variant = os.path.splitext(name)[0].rsplit("_", 1)[1]
    m, b = "M" in variant, "B" in variant
    assert cfg.TEST.AUG.ENABLED == m
    assert cfg.TEST.ITERATIVE_BBOX_REG.ENABLED == cfg.TEST.BOX_VOTING.ENABLED == b
    if m:  # the paper's scales (the paper's Sec. 6), no flip
        assert cfg.INPUT.MIN_SIZE_TRAIN == (480, 576, 688, 864, 900)
        assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
        assert cfg.INPUT.MAX_SIZE_TRAIN == 1000
        assert tuple(cfg.TEST.AUG.MIN_SIZES) == (480, 576, 688, 864, 1000)
        assert cfg.TEST.AUG.MAX_SIZE == 1000 and not cfg.TEST.AUG.FLIP
    if b:  # the paper's values are the defaults
        assert cfg.TEST.ITERATIVE_BBOX_REG.NUM_ITERATIONS == 2
        assert cfg.TEST.BOX_VOTING.NMS_THRESH == 0.3
        assert cfg.TEST.BOX_VOTING.IOU_THRESH == 0.5
    assert cfg.OUTPUT_DIR.endswith(os.path.splitext(os.path.basename(name))[0])


def test_voc0712_configs_train_on_both_years():
    for name in ("frcn_vgg16_voc0712.yaml", "frcn_vgg16_ohem_voc0712.yaml"):
        cfg = load(name)
        assert cfg.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval")
        assert len(cfg.DATASETS.PROPOSAL_FILES_TRAIN) == 2
        assert cfg.DATASETS.TEST == ("voc_2007_test",)
