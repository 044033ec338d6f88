"""The one range of every OHEM setting, with the config key that sets it.

Every component checks its arguments here (so a component built by hand gets the same rule as
one built from a config), and :func:`check_config_values` the values of a whole config at
once, naming each key. The bottom of ``modeling/ohem``: it imports nothing of the project.
"""

__all__ = [
    "FAST_READONLY_MODES",
    "HARDNESS_CHOICES",
    "PRIOR_TARGETS",
    "check_config_values",
    "check_settings",
]

HARDNESS_CHOICES = ("cls+box", "cls")
PRIOR_TARGETS = ("ALL_ROIS", "STOCK_SAMPLER")
FAST_READONLY_MODES = ("", "lowrank")

_OHEM = "MODEL.ROI_HEADS.OHEM."
# setting: (config key, in range?, the range in words)
_SETTINGS = {
    "batch_size_per_image": (
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE (hard RoIs per image)",
        lambda v: v > 0,
        "> 0",
    ),
    "nms_thresh": (_OHEM + "NMS_THRESH", lambda v: v >= 0, ">= 0 (>= 1 turns NMS off)"),
    "positive_fraction": (
        _OHEM + "POSITIVE_FRACTION (positive_fraction)",
        lambda v: v == -1 or 0 < v <= 1,
        "-1 or in (0, 1]",
    ),
    "hardness": (_OHEM + "HARDNESS", lambda v: v in HARDNESS_CHOICES, f"one of {HARDNESS_CHOICES}"),
    "readonly_chunk_size": (_OHEM + "READONLY_CHUNK_SIZE", lambda v: v >= 0, ">= 0"),
    "fast_readonly_mode": (
        _OHEM + "FAST_READONLY.MODE",
        lambda v: v in FAST_READONLY_MODES,
        f"one of {FAST_READONLY_MODES}",
    ),
    "rank": (_OHEM + "FAST_READONLY.RANK", lambda v: v > 0, "> 0"),
    "refresh_period": (_OHEM + "FAST_READONLY.REFRESH_PERIOD", lambda v: v > 0, "> 0"),
    "num_layers": (_OHEM + "FAST_READONLY.NUM_LAYERS", lambda v: v >= 0, ">= 0"),
    "suspect_bg_weight": (_OHEM + "SUSPECT_BG_WEIGHT", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "suspect_bg_score": (_OHEM + "SUSPECT_BG_SCORE", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "suspect_bg_max_iou": (_OHEM + "SUSPECT_BG_MAX_IOU", lambda v: 0 < v <= 1, "in (0, 1]"),
    "trim_bg_fraction": (_OHEM + "TRIM_BG_FRACTION", lambda v: 0 <= v < 1, "in [0, 1)"),
    "easy_bg_fraction": (_OHEM + "EASY_BG_FRACTION", lambda v: 0 <= v < 1, "in [0, 1)"),
    "prior_target": (
        _OHEM + "PRIOR_CORRECTION_TARGET",
        lambda v: v in PRIOR_TARGETS,
        f"one of {PRIOR_TARGETS}",
    ),
    "remainder_num": (
        _OHEM + "REMAINDER.NUM_PER_IMAGE",
        lambda v: v >= 0,
        ">= 0 (and at most MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE)",
    ),
    "remainder_target": (
        _OHEM + "REMAINDER.TARGET",
        lambda v: v in PRIOR_TARGETS,
        f"one of {PRIOR_TARGETS}",
    ),
    "remainder_alpha": (_OHEM + "REMAINDER.ALPHA", lambda v: v >= 0, ">= 0"),
    "remainder_smoothing": (_OHEM + "REMAINDER.SMOOTHING", lambda v: v >= 0, ">= 0"),
    "remainder_exponent": (
        _OHEM + "REMAINDER.WEIGHT_EXPONENT",
        lambda v: 0 <= v <= 1,
        "in [0, 1]",
    ),
    # The stock sampler's foreground share, the target of PRIOR_CORRECTION_TARGET STOCK_SAMPLER.
    "sampler_fg_fraction": ("MODEL.ROI_HEADS.POSITIVE_FRACTION", lambda v: 0 < v < 1, "in (0, 1)"),
}


def _problems(values: dict, *, by_key: bool) -> list[str]:
    """One message per out-of-range value, naming its config key first (``by_key``) or the
    argument first, with the key after it."""
    problems = []
    for name, value in values.items():
        key, in_range, wanted = _SETTINGS[name]
        if not in_range(value):
            shown = repr(value) if isinstance(value, str) else value
            if by_key:
                problems.append(f"{key} must be {wanted}, got {shown}")
            else:
                problems.append(f"{name} must be {wanted}, got {shown} (config: {key})")
    return problems


def check_settings(**values) -> None:
    """Raise ValueError naming every argument (and its config key) that is out of range."""
    problems = _problems(values, by_key=False)
    if problems:
        raise ValueError("Invalid OHEM setting: " + "; ".join(problems))


def check_config_values(values: dict) -> None:
    """Raise ValueError naming every config key (by its setting's name in `values`) whose
    value is out of range."""
    problems = _problems(values, by_key=True)
    if problems:
        raise ValueError("Invalid OHEM config: " + "; ".join(problems))
