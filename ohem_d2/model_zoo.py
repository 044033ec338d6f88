"""The project's configs, shipped inside the package as Detectron2 ships its model zoo's.

``get_config_file("bccd/ohem.yaml")`` is the path of a config in an installed wheel as in a
clone (where ``configs/`` is a link to ``ohem_d2/configs``); ``get_config`` loads a YAML
config into a Detectron2 CfgNode with the project's keys, or a LazyConfig ``.py`` file.

A YAML config may take one of Detectron2's own model-zoo configs as its base with
``_BASE_: "model_zoo/<path under Detectron2's configs/>"``; :func:`merge_config_file` finds
it in the installed Detectron2, so no link to Detectron2's configs is needed.
"""

import os

import yaml
from detectron2.config import CfgNode, LazyConfig, get_cfg

from .config import add_ohem_config

__all__ = [
    "CONFIG_DIR",
    "ConfigKindError",
    "get_config",
    "get_config_file",
    "is_lazy_config",
    "merge_config_file",
]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# The prefix of a _BASE_ that names one of Detectron2's bundled model-zoo configs.
ZOO_PREFIX = "model_zoo/"


class ConfigKindError(ValueError):
    """A LazyConfig file given where a YAML config is expected, or the reverse."""


def is_lazy_config(path: str) -> bool:
    """True for a LazyConfig (``.py``) file, False for a YAML config; anything else raises."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".py":
        return True
    if ext in (".yaml", ".yml"):
        return False
    raise ConfigKindError(
        f"{path}: not a config file; give a YAML config (.yaml, Detectron2's CfgNode) or a "
        "LazyConfig (.py)"
    )


def get_config_file(config_path: str) -> str:
    """Absolute path of one of the project's configs, e.g. ``"frcn_vgg16_ohem.yaml"``,
    ``"bccd/ohem.yaml"`` or ``"lazy/mask_rcnn_fpn_ohem.py"`` (relative to ``configs/``)."""
    path = os.path.join(CONFIG_DIR, config_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{config_path} is not one of ohem_d2's configs (looked in {CONFIG_DIR})"
        )
    return path


def merge_config_file(cfg: CfgNode, path: str) -> CfgNode:
    """``cfg.merge_from_file(path)``, where a ``_BASE_`` of ``model_zoo/...`` is resolved in
    the installed Detectron2's model zoo (other bases resolve as Detectron2 resolves them)."""
    if is_lazy_config(path):
        raise ConfigKindError(
            f"{path} is a LazyConfig (.py) file, not a YAML config: load it with "
            "detectron2.config.LazyConfig.load (train_net.py accepts both kinds)"
        )
    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    base = loaded.get("_BASE_") if isinstance(loaded, dict) else None
    zoo_base = isinstance(base, str) and base.startswith(ZOO_PREFIX)
    # In a clone, scripts/setup.sh links configs/model_zoo to the same files.
    if not zoo_base or os.path.exists(os.path.join(os.path.dirname(path), base)):
        cfg.merge_from_file(path)
        return cfg
    from detectron2 import model_zoo

    cfg.merge_from_file(model_zoo.get_config_file(base[len(ZOO_PREFIX) :]))
    rest = {k: v for k, v in loaded.items() if k != "_BASE_"}
    cfg.merge_from_other_cfg(CfgNode(rest))
    return cfg


def get_config(config_path: str):
    """Load one of the project's configs (a path relative to ``configs/``): a CfgNode with
    :func:`add_ohem_config` keys for YAML, the LazyConfig's root node for ``.py``."""
    path = get_config_file(config_path)
    if is_lazy_config(path):
        return LazyConfig.load(path)
    cfg = get_cfg()
    add_ohem_config(cfg)
    return merge_config_file(cfg, path)
