# Detectron2's LazyConfig Cascade Mask R-CNN R50-FPN 1x (common/models/cascade_rcnn.py) with
# OHEM at every cascade stage (OHEMCascadeROIHeads): each stage mines its own hard set from
# all its candidates; the mask head trains on stage 0's. Data, schedule, training settings and
# the miner are those of mask_rcnn_fpn_ohem.py.
#   python train_net.py --config-file configs/lazy/cascade_mask_rcnn_fpn_ohem.py \
#       train.init_checkpoint=/path/to/R-50.pkl
from detectron2.model_zoo import get_config

from ohem_d2.modeling.ohem import OHEMCascadeROIHeads

from .mask_rcnn_fpn_ohem import dataloader, lr_multiplier, optimizer, train  # noqa: F401
from .mask_rcnn_fpn_ohem import model as _mask_rcnn

model = get_config("common/models/cascade_rcnn.py").model
model.backbone.bottom_up.freeze_at = 2
model.roi_heads._target_ = OHEMCascadeROIHeads
model.roi_heads.miner = _mask_rcnn.roi_heads.miner
