# Detectron2's LazyConfig Mask R-CNN R50-FPN 1x (COCO-InstanceSegmentation/
# mask_rcnn_R_50_FPN_1x.py) with the OHEM head: the ROI head's class is swapped for
# OHEMROIHeads and given a HardExampleMiner. The mask head trains on the hard set's foreground.
#   python train_net.py --config-file configs/lazy/mask_rcnn_fpn_ohem.py --num-gpus 8 \
#       train.init_checkpoint=/path/to/R-50.pkl
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from ohem_d2.modeling.ohem import HardExampleMiner, OHEMROIHeads

dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
train = get_config("common/train.py").train
model = get_config("common/models/mask_rcnn_fpn.py").model

model.backbone.bottom_up.freeze_at = 2
# The zoo's ImageNet R-50 URL would be downloaded at run time; point this at a local copy.
train.init_checkpoint = ""
# Box and mask AP, also when a model has no detection yet (COCOEvaluator would otherwise
# infer the tasks from the predictions).
dataloader.evaluator.tasks = ("bbox", "segm")

model.roi_heads._target_ = OHEMROIHeads
# The hard set has the size of the zoo's sampled set (512 per image); the zoo's matcher
# already makes every RoI below IoU 0.5 background, as OHEM's bg_lo = 0 does.
model.roi_heads.miner = L(HardExampleMiner)(
    batch_size_per_image="${..batch_size_per_image}",
    nms_thresh=0.7,
    nms_per_label=True,
    hardness="cls+box",
    positive_fraction=-1.0,
    readonly_train_mode=True,
)
