"""Fast R-CNN: GeneralizedRCNN whose proposal generator reads each input's own proposals."""

from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList, Instances


@META_ARCH_REGISTRY.register()
class FastRCNN(GeneralizedRCNN):
    """Detectron2's GeneralizedRCNN for precomputed proposals.

    GeneralizedRCNN calls a proposal generator with (images, features, gt_instances) only,
    so precomputed boxes could reach the ROI heads only with no generator at all. Here the
    generator (e.g. `SelectiveSearchProposals`) receives each input's "proposals" and
    decides which of them the ROI heads see, in training and inference alike.
    """

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
        if self.proposal_generator is None:
            return proposals
        return self.proposal_generator(proposals, image_names=names)

    def forward(self, batched_inputs: list[dict]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals = self.select_proposals(batched_inputs)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        return detector_losses

    def inference(
        self, batched_inputs: list[dict], detected_instances=None, do_postprocess: bool = True
    ):
        if detected_instances is not None:
            raise ValueError("FastRCNN does not refine given detections")
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals = self.select_proposals(batched_inputs)
        results, _ = self.roi_heads(images, features, proposals, None)
        if not do_postprocess:
            return results
        return self.postprocess(results, batched_inputs, images)

    @staticmethod
    def postprocess(results: list[Instances], batched_inputs: list[dict], images: ImageList):
        """Rescale detections to each input's original size (its "height"/"width")."""
        processed = []
        for r, x, size in zip(results, batched_inputs, images.image_sizes):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            processed.append({"instances": detector_postprocess(r, height, width)})
        return processed
