"""Shared rule of the project's dataset registrations."""

import operator
import os


def is_registered_as(name: str, metadata: dict, mismatch, same=operator.eq) -> bool:
    """True if dataset `name` is already registered with `metadata` (each value `same` as the
    registered one; a missing one is None), False if it is not registered at all.

    Raises:
        mismatch(registered metadata): it is registered as something else (Detectron2's
            metadata cannot change after registration, so registering it again would
            silently keep the old one).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        return False
    registered = MetadataCatalog.get(name)
    if all(same(registered.get(k, None), v) for k, v in metadata.items()):
        return True
    raise mismatch(registered)


def _same_folder(registered, dirname):
    return registered is not None and os.path.abspath(registered) == os.path.abspath(dirname)


def is_registered_for(name: str, dirname: str) -> bool:
    """True if dataset `name` is already registered for folder `dirname`, False if it is not
    registered at all.

    Raises:
        ValueError: it is registered for another folder (see :func:`is_registered_as`).
    """

    def mismatch(registered):
        registered = registered.get("dirname", None)
        return ValueError(
            f"Dataset {name!r} is already registered with dirname {registered!r}, not {dirname!r}."
        )

    return is_registered_as(name, {"dirname": dirname}, mismatch, same=_same_folder)
