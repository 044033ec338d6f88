# Detectron2's LazyConfig Cascade Mask R-CNN R50-FPN 1x (common/models/cascade_rcnn.py) with
# OHEM at every cascade stage (OHEMCascadeROIHeads): each stage mines its own hard set from
# all its candidates; the mask head trains on stage 0's.
#   python train_net.py --config-file configs/lazy/cascade_mask_rcnn_fpn_ohem.py \
#       train.init_checkpoint=/path/to/R-50.pkl
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from ohem_d2.modeling.ohem import HardExampleMiner, OHEMCascadeROIHeads

dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
train = get_config("common/train.py").train
model = get_config("common/models/cascade_rcnn.py").model

model.backbone.bottom_up.freeze_at = 2
train.init_checkpoint = ""
# Box and mask AP, also when a model has no detection yet (COCOEvaluator would otherwise
# infer the tasks from the predictions).
dataloader.evaluator.tasks = ("bbox", "segm")

model.roi_heads._target_ = OHEMCascadeROIHeads
model.roi_heads.miner = L(HardExampleMiner)(
    batch_size_per_image="${..batch_size_per_image}",
    nms_thresh=0.7,
    nms_per_label=True,
    hardness="cls+box",
    positive_fraction=-1.0,
    readonly_train_mode=True,
)
