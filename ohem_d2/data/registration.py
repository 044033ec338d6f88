"""Shared rule of the project's dataset registrations."""

import os


def is_registered_for(name: str, dirname: str) -> bool:
    """True if dataset `name` is already registered for folder `dirname`, False if it is not
    registered at all.

    Raises:
        ValueError: it is registered for another folder (Detectron2's metadata cannot change
            after registration, so registering it again would silently keep the old one).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        return False
    registered = MetadataCatalog.get(name).get("dirname", None)
    if registered is None or os.path.abspath(registered) != os.path.abspath(dirname):
        raise ValueError(
            f"Dataset {name!r} is already registered with dirname {registered!r}, not {dirname!r}."
        )
    return True
