"""Config keys of ohem-d2. Defaults are the paper's values (Shrivastava et al., CVPR 2016,
Secs. 4-6) and its authors' Caffe code's."""

from detectron2.config import CfgNode as CN


class MissingOHEMConfigError(ValueError):
    """A config without this project's keys: `add_ohem_config(cfg)` was not called."""


def require_ohem_config(cfg, node: str) -> None:
    """Raise :class:`MissingOHEMConfigError` naming the missing call if ``cfg`` lacks the
    project's node ``node`` (e.g. "MODEL.ROI_HEADS.OHEM"), instead of a bare AttributeError
    from deep inside a component's ``from_config``."""
    value = cfg
    for part in node.split("."):
        if part not in value:
            raise MissingOHEMConfigError(
                f"The config has no {node}: call ohem_d2.add_ohem_config(cfg) after "
                "get_cfg() and before merging a config file (it adds this project's keys "
                "with the paper's defaults)."
            )
        value = value[part]


def add_ohem_config(cfg):
    """Add every key this project defines to a Detectron2 config, in place.

    Idempotent, so that a project that calls it twice (e.g. once per extension) is safe.
    """
    _C = cfg

    # --- VGG backbones (Simonyan & Zisserman; VGG_CNN_M_1024 of Chatfield et al.) ---
    if "VGG" not in _C.MODEL:
        _C.MODEL.VGG = CN()
    # "VGG16" (13 conv layers, conv5_3 at stride 16, pool5 removed) or "VGG_CNN_M_1024".
    _C.MODEL.VGG.ARCH = "VGG16"
    # Multiplies every conv layer's channel count; < 1 gives a narrow net of the same shape
    # for CPU demos and tests. 1.0 is the paper's network.
    _C.MODEL.VGG.WIDTH_MULT = 1.0
    # Output sizes of fc6, fc7 of the box head (VGGFCHead): 4096/4096 for VGG16 and
    # 4096/1024 for VGG_CNN_M_1024.
    _C.MODEL.VGG.FC_DIMS = [4096, 4096]
    # Normalisation after every conv layer: "" (the paper's VGG has none) or a Detectron2
    # norm ("BN", "GN", "SyncBN"). Only for training from scratch (CPU demo, tests).
    _C.MODEL.VGG.NORM = ""

    # Dropout probability after fc6 and fc7 of VGGFCHead (the paper: 0.5).
    _C.MODEL.ROI_BOX_HEAD.DROPOUT = 0.5

    # --- Precomputed proposals (SelectiveSearchProposals) ---
    # Detectron2's PROPOSAL_GENERATOR.MIN_SIZE is used as documented there: boxes whose
    # side is smaller (in pixels of the resized image) are dropped.
    # Proposal files may be Detectron2 pickles only when the user says they are trusted:
    # unpickling runs arbitrary code. The .npz format is always safe.
    _C.DATASETS.PROPOSAL_FILES_TRUSTED = False

    # --- Online hard example mining (MODEL.ROI_HEADS.OHEM) ---
    _C.MODEL.ROI_HEADS.OHEM = CN()
    # IoU threshold of the NMS that removes near-duplicate RoIs, with the per-RoI loss as
    # score (paper: 0.7). Values >= 1.0 turn the NMS off.
    _C.MODEL.ROI_HEADS.OHEM.NMS_THRESH = 0.7
    # Suppress only among RoIs of the same assigned label, as the authors' code does.
    # False runs one NMS over all RoIs of the image.
    _C.MODEL.ROI_HEADS.OHEM.NMS_PER_LABEL = True
    # Which loss ranks RoIs: "cls+box" (paper: softmax cross-entropy + smooth-L1 for
    # foreground RoIs) or "cls" (classification loss only).
    _C.MODEL.ROI_HEADS.OHEM.HARDNESS = "cls+box"
    # -1: pure OHEM, no foreground/background ratio (paper). A value in (0, 1] keeps at
    # most that fraction of foreground RoIs in the hard set (mmdetection's OHEM sampler).
    _C.MODEL.ROI_HEADS.OHEM.POSITIVE_FRACTION = -1.0
    # Run the readonly pass with dropout active, as the authors' Caffe net did (True), or
    # deterministically (False).
    _C.MODEL.ROI_HEADS.OHEM.READONLY_TRAIN_MODE = True
    # RoIs per chunk of the readonly pass, so its memory does not grow with the number of
    # proposals. 0 scores all RoIs of an image at once.
    _C.MODEL.ROI_HEADS.OHEM.READONLY_CHUNK_SIZE = 1024
    # --- Beyond the paper: incomplete annotations (all off by default) ---
    # Where datasets leave objects unlabelled, the hardest "background" RoIs are often real
    # objects: OHEM would train on them as negatives. A background candidate is a *suspect*
    # when the readonly pass gives some object class a probability >= SUSPECT_BG_SCORE while
    # its IoU with every ground-truth box is < SUSPECT_BG_MAX_IOU. Its hardness (the ranking
    # loss, not the training loss) is multiplied by SUSPECT_BG_WEIGHT: 1.0 is the paper
    # (no change), 0.0 removes suspects from the candidates. The two thresholds also define
    # the diagnostic "ohem/hard_bg_suspect" whatever the weight.
    _C.MODEL.ROI_HEADS.OHEM.SUSPECT_BG_WEIGHT = 1.0
    _C.MODEL.ROI_HEADS.OHEM.SUSPECT_BG_SCORE = 0.5
    _C.MODEL.ROI_HEADS.OHEM.SUSPECT_BG_MAX_IOU = 0.1
    # Trimmed ranking: after the NMS, skip the hardest TRIM_BG_FRACTION of each image's
    # background candidates (0.0: the paper).
    _C.MODEL.ROI_HEADS.OHEM.TRIM_BG_FRACTION = 0.0
    # Keep this share of each image's BATCH_SIZE_PER_IMAGE for background RoIs drawn at
    # random, as FRCN's sampler draws them (mostly easy); the rest is the hardest RoIs
    # (0.0: the paper). floor(share * batch) RoIs.
    _C.MODEL.ROI_HEADS.OHEM.EASY_BG_FRACTION = 0.0
    # --- Beyond the paper: dense images ---
    # OHEM's hard sets are mostly foreground where images are crowded, so its classifier
    # learns a class prior far from the one it meets at test time (most RoIs background):
    # its scores get a floor. True counts, in training, the classes of all labelled RoIs and
    # of the hard sets (saved with the model) and, at inference, adds log(pi_all / pi_hard)
    # to the class logits. Training is unchanged. False: the paper.
    _C.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION = False
    # The class prior the correction moves the scores to. "ALL_ROIS": that of all labelled
    # RoIs. "STOCK_SAMPLER": that of Detectron2's sampled minibatch, for which the stock
    # test settings (SCORE_THRESH_TEST, DETECTIONS_PER_IMAGE) were tuned: a share
    # ROI_HEADS.POSITIVE_FRACTION of foreground (the sampler's share on any image with at
    # least POSITIVE_FRACTION x BATCH_SIZE_PER_IMAGE foreground RoIs), background the rest.
    _C.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION_TARGET = "ALL_ROIS"
    # True: each foreground class moves to its share of all labelled foreground RoIs. False:
    # only the foreground / background split moves; the foreground classes keep their
    # proportions in the hard sets (so a rare class that OHEM mines often is not pushed
    # down further than the others).
    _C.MODEL.ROI_HEADS.OHEM.PRIOR_CORRECTION_PER_CLASS = True
    # Post-hoc score calibration (off: the paper): at inference, each detection's score s of
    # class c becomes sigmoid(a_c logit(s) + b_c) (per-class Platt scaling, Küppers et al.,
    # CVPR-W 2020), and detections under ROI_HEADS.SCORE_THRESH_TEST after it are dropped.
    # (a_c, b_c) are a buffer saved with the model (roi_heads.ohem_score_calibration), the
    # identity until `python -m ohem_d2.calibrate_scores` fits them on a held-out dataset.
    _C.MODEL.ROI_HEADS.OHEM.SCORE_CALIBRATION = False
    # --- Beyond the paper: the hard set plus a weighted random remainder (off: the paper) ---
    # The hard set alone teaches the classifier the hard sets' class make-up. With
    # NUM_PER_IMAGE R > 0, each image's BATCH_SIZE_PER_IMAGE B RoIs are the hard set of B - R
    # (NMS, then the top B - R by loss) plus R RoIs drawn from the labelled RoIs not in it,
    # within the foreground and the background strata, and each RoI is weighted so that the
    # minibatch loss estimates the mean loss over all labelled RoIs with the strata at
    # TARGET's shares (ohem_d2/modeling/ohem/remainder.py). R = B: no deterministic hard set.
    _C.MODEL.ROI_HEADS.OHEM.REMAINDER = CN()
    _C.MODEL.ROI_HEADS.OHEM.REMAINDER.NUM_PER_IMAGE = 0
    # The strata's shares: "ALL_ROIS" (as among all labelled RoIs of the image) or
    # "STOCK_SAMPLER" (ROI_HEADS.POSITIVE_FRACTION foreground, as Detectron2's sampler).
    _C.MODEL.ROI_HEADS.OHEM.REMAINDER.TARGET = "ALL_ROIS"
    # A RoI is drawn with probability proportional to (loss + SMOOTHING * mean loss) ** ALPHA
    # (Katharopoulos & Fleuret, ICML 2018); ALPHA 0 draws uniformly, without replacement.
    _C.MODEL.ROI_HEADS.OHEM.REMAINDER.ALPHA = 0.0
    _C.MODEL.ROI_HEADS.OHEM.REMAINDER.SMOOTHING = 1.0
    # k in [0, 1]: a drawn RoI's importance weight 1 / (|pool| q) is raised to k. 1: the
    # minibatch loss is unbiased; 0: biased toward hard RoIs, the strata still at their shares.
    _C.MODEL.ROI_HEADS.OHEM.REMAINDER.WEIGHT_EXPONENT = 1.0
    # A faster, approximate readonly pass (beyond the paper; off by default). The hard set
    # then differs slightly from the exact one (benchmarks/README.md measures how much).
    _C.MODEL.ROI_HEADS.OHEM.FAST_READONLY = CN()
    # "": the exact readonly pass (paper). "lowrank": the first NUM_LAYERS fully-connected
    # layers of the box head that a rank-RANK factorisation makes cheaper (VGG16: fc6) run as
    # two thin layers W ~ P P^T W, P the top RANK principal directions of the layer's outputs.
    _C.MODEL.ROI_HEADS.OHEM.FAST_READONLY.MODE = ""
    # Rank of the factorised layers.
    _C.MODEL.ROI_HEADS.OHEM.FAST_READONLY.RANK = 256
    # Every REFRESH_PERIOD readonly passes, one runs exactly and re-estimates P from its
    # outputs (the first pass always does).
    _C.MODEL.ROI_HEADS.OHEM.FAST_READONLY.REFRESH_PERIOD = 200
    # How many layers to factorise, in module order; 0: all that get cheaper. 1 (fc6 alone)
    # because layers after a dropout lose its noise in a low-rank stand-in.
    _C.MODEL.ROI_HEADS.OHEM.FAST_READONLY.NUM_LAYERS = 1

    # --- B: iterative bounding-box regression and box voting (inference only, off) ---
    # The paper's B (after MR-CNN, Gidaris & Komodakis 2015): proposals are scored and
    # regressed (R1), R1 again with the same network (R2); NMS on R1 U R2, then each kept box
    # is replaced by the score-weighted mean of its class's boxes that overlap it. The
    # values marked "paper" are the paper's (Sec. 6); "MR-CNN" marks its code's, not the
    # default.
    # Standard and C4 heads (OHEM or not); refused for Cascade heads, whose stages already
    # regress iteratively.
    _C.TEST.ITERATIVE_BBOX_REG = CN()
    _C.TEST.ITERATIVE_BBOX_REG.ENABLED = False
    # Passes of the RoI network: 2 (paper, MR-CNN) gives R1 and R2; each pass scores and
    # regresses the previous pass's boxes, each box for its own class.
    _C.TEST.ITERATIVE_BBOX_REG.NUM_ITERATIONS = 2
    # Which boxes of a pass go on to the next: those scoring above
    # MODEL.ROI_HEADS.SCORE_THRESH_TEST (paper: "the high-scoring boxes"), then per class an
    # NMS at this IoU (1.0: none; MR-CNN: 0.95) and the TOPK_PER_CLASS best per image and
    # class (0: all; MR-CNN: about 15). Fewer boxes make the next pass cheaper.
    _C.TEST.ITERATIVE_BBOX_REG.NEXT_PASS_NMS_THRESH = 1.0
    _C.TEST.ITERATIVE_BBOX_REG.NEXT_PASS_TOPK_PER_CLASS = 0
    _C.TEST.BOX_VOTING = CN()
    _C.TEST.BOX_VOTING.ENABLED = False
    # The per-class NMS before the vote (paper, MR-CNN: 0.3); it replaces
    # MODEL.ROI_HEADS.NMS_THRESH_TEST when voting is on.
    _C.TEST.BOX_VOTING.NMS_THRESH = 0.3
    # A kept box becomes the score-weighted mean of the boxes of its class with IoU >= this
    # with it, itself included (paper, MR-CNN: 0.5); its score is unchanged.
    _C.TEST.BOX_VOTING.IOU_THRESH = 0.5
    # M, multi-scale testing, uses Detectron2's TEST.AUG keys (ENABLED, MIN_SIZES, MAX_SIZE,
    # FLIP): the configs of the paper's M set MIN_SIZES (480, 576, 688, 864, 1000),
    # MAX_SIZE 1000 and FLIP False (ohem_d2.modeling.multiscale).
    return cfg
