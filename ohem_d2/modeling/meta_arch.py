"""Fast R-CNN: GeneralizedRCNN whose proposal generator reads each input's own proposals."""

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Instances
from torch import nn


@META_ARCH_REGISTRY.register()
class FastRCNN(GeneralizedRCNN):
    """Detectron2's GeneralizedRCNN for precomputed proposals.

    GeneralizedRCNN calls a proposal generator with (images, features, gt_instances) only;
    without one (``proposal_generator=None``) it hands each input's "proposals" to the ROI
    heads unchanged. FastRCNN builds the configured generator (e.g.
    `SelectiveSearchProposals`) as ``proposal_selector`` and gives GeneralizedRCNN none:
    before GeneralizedRCNN's own ``forward`` (training) and ``inference`` run, each input's
    "proposals" are replaced by the ones the selector keeps (`select_proposals`). Everything
    else (losses, ``VIS_PERIOD`` visualisation, postprocessing, ``do_postprocess``) is
    Detectron2's.
    """

    @configurable
    def __init__(self, *, proposal_generator: nn.Module | None, **kwargs):
        """
        Args:
            proposal_generator: called as ``proposal_generator(proposals, image_names=names)``
                on the inputs' precomputed proposals; None: the ROI heads see them all.
            kwargs: the other arguments of :class:`GeneralizedRCNN`.
        """
        super().__init__(proposal_generator=None, **kwargs)
        self.proposal_selector = proposal_generator

    def select_proposals(self, batched_inputs: list[dict]) -> list[Instances]:
        """The proposals the ROI heads see for `batched_inputs`: each input's "proposals"
        (resized with the image), filtered by the proposal generator."""
        names = [
            str(x.get("file_name", x.get("image_id", i))) for i, x in enumerate(batched_inputs)
        ]
        missing = [n for n, x in zip(names, batched_inputs) if "proposals" not in x]
        if missing:
            raise KeyError(
                f"FastRCNN needs precomputed proposals, but input(s) {missing[:3]} have none: "
                "set MODEL.LOAD_PROPOSALS True and DATASETS.PROPOSAL_FILES_TRAIN/TEST."
            )
        proposals = [x["proposals"].to(self.device) for x in batched_inputs]
        if self.proposal_selector is None:
            return proposals
        return self.proposal_selector(proposals, image_names=names)

    def _with_selected_proposals(self, batched_inputs: list[dict]) -> list[dict]:
        """Copies of the inputs whose "proposals" are `select_proposals`' (the caller's dicts
        are left as they are)."""
        selected = self.select_proposals(batched_inputs)
        return [{**x, "proposals": p} for x, p in zip(batched_inputs, selected)]

    def forward(self, batched_inputs: list[dict]):
        if self.training:  # at inference GeneralizedRCNN.forward calls self.inference
            batched_inputs = self._with_selected_proposals(batched_inputs)
        return super().forward(batched_inputs)

    def inference(
        self, batched_inputs: list[dict], detected_instances=None, do_postprocess: bool = True
    ):
        if detected_instances is not None:
            raise ValueError("FastRCNN does not refine given detections")
        inputs = self._with_selected_proposals(batched_inputs)
        return super().inference(inputs, do_postprocess=do_postprocess)
