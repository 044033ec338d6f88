"""Training hooks that show what OHEM does: the loss over all RoIs (paper Fig. 3) and
pictures of the hard RoIs it picks."""

import json
import os

import cv2
import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage

from ..modeling.ddp import unwrap_ddp
from ..modeling.ohem import ProposalLabeller, per_roi_losses, readonly_head, scores_as_trained

# BGR colours of the slide deck's figure; hard background that looks like an unlabelled
# object (the miner's ``suspect_bg``) in magenta.
GT_COLOUR, FG_COLOUR, BG_COLOUR = (0, 255, 255), (0, 0, 255), (255, 0, 0)
SUSPECT_COLOUR = (255, 0, 255)


def rgb(bgr):
    """A BGR uint8 colour as the (r, g, b) in [0, 1] that Detectron2's Visualizer draws."""
    return tuple(c / 255 for c in bgr[::-1])


def label_all_rois(proposals, targets, num_classes):
    """Every proposal plus the GT boxes labelled as the paper defines it for OHEM: foreground
    (the matched GT class) at IoU >= 0.5, background (`num_classes`) below."""
    return ProposalLabeller(num_classes)(proposals, targets)


class RoILossProbe(HookBase):
    """Every `period` iterations, the mean loss per RoI over ALL RoIs of fixed training images,
    split into the parts that foreground and background RoIs contribute.

    The paper's Fig. 3 compares methods by this number (not by the loss on each method's own
    minibatch, which differs by construction). Dropout is off while probing, so the value
    depends on the weights only. ``fg_part + bg_part == mean_roi_loss``: each part is the sum
    of its RoIs' losses divided by the number of all RoIs. Written to
    `<output_dir>/roi_loss_probe.json` and to the EventStorage as "probe/mean_roi_loss",
    "probe/roi_loss_fg_part" and "probe/roi_loss_bg_part".
    """

    KEYS = ("mean_roi_loss", "fg_part", "bg_part", "fg_fraction")

    def __init__(self, inputs, period, output_dir):
        self.inputs, self.period, self.output_dir = inputs, period, output_dir
        self.history = []

    def roi_losses(self):
        """(R,) loss of every RoI of the probe images, and (R,) bool: is it foreground."""
        model = unwrap_ddp(self.trainer.model)
        was_training = model.training
        model.eval()
        head = model.roi_heads
        try:
            # The loss of the scores as trained: without an inference-time prior shift.
            with torch.no_grad(), scores_as_trained(model):
                images = model.preprocess_image(self.inputs)
                features = model.backbone(images.tensor)
                proposals = model.select_proposals(self.inputs)
                targets = [x["instances"].to(model.device) for x in self.inputs]
                labeled = label_all_rois(proposals, targets, head.num_classes)
                network = readonly_head(head)
                feats = [features[f] for f in head.in_features]
                predictions = network(feats, [p.proposal_boxes for p in labeled])
                losses = per_roi_losses(network.predictor, predictions, labeled)
                is_fg = torch.cat([p.gt_classes < head.num_classes for p in labeled])
                return losses, is_fg
        finally:
            model.train(was_training)

    def measure(self):
        """A dict with the values of :attr:`KEYS`."""
        losses, is_fg = self.roi_losses()
        count = max(1, losses.numel())
        fg_part = float(losses[is_fg].sum()) / count
        bg_part = float(losses[~is_fg].sum()) / count
        return {
            "mean_roi_loss": fg_part + bg_part,
            "fg_part": fg_part,
            "bg_part": bg_part,
            "fg_fraction": float(is_fg.sum()) / count,
        }

    def after_step(self):
        it = self.trainer.iter
        if it == 0 or (it + 1) % self.period == 0 or it + 1 == self.trainer.max_iter:
            values = self.measure()
            self.history.append((it + 1, values))
            storage = self.trainer.storage
            storage.put_scalar("probe/mean_roi_loss", values["mean_roi_loss"], smoothing_hint=False)
            storage.put_scalar("probe/roi_loss_fg_part", values["fg_part"], smoothing_hint=False)
            storage.put_scalar("probe/roi_loss_bg_part", values["bg_part"], smoothing_hint=False)

    def after_train(self):
        os.makedirs(self.output_dir, exist_ok=True)
        record = {"iteration": [i for i, _ in self.history]}
        record.update({k: [v[k] for _, v in self.history] for k in self.KEYS})
        with open(os.path.join(self.output_dir, "roi_loss_probe.json"), "w") as f:
            json.dump(record, f)


class TrainingProgress(HookBase):
    """A progress bar with the iteration, the total loss and the ETA of the run (stderr)."""

    def __init__(self, description):
        self.description = description
        self.bar = None

    def before_train(self):
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.trainer.max_iter,
            initial=self.trainer.start_iter,
            desc=self.description,
            unit="it",
            dynamic_ncols=True,
            mininterval=2.0,
        )

    def after_step(self):
        latest = self.trainer.storage.latest()
        if "total_loss" in latest:
            self.bar.set_postfix(loss=f"{latest['total_loss'][0]:.3f}", refresh=False)
        self.bar.update(1)

    def after_train(self):
        if self.bar is not None:
            self.bar.close()


def draw_hard_examples(image_rgb, gt_boxes, hard_boxes, hard_is_fg, hard_is_suspect=None, scale=2):
    """An BGR uint8 picture: GT yellow, hard foreground RoIs red, hard background blue, and
    hard background the readonly pass calls an object away from any GT (suspected
    unlabelled objects) magenta."""
    from detectron2.utils.visualizer import Visualizer

    vis = Visualizer(np.ascontiguousarray(image_rgb), scale=scale)
    if hard_is_suspect is None:
        hard_is_suspect = np.zeros_like(hard_is_fg)
    # Plain background first, suspects over it, foreground on top.
    kind = np.where(hard_is_fg, 2, np.where(hard_is_suspect, 1, 0))
    colours = (BG_COLOUR, SUSPECT_COLOUR, FG_COLOUR)
    order = np.argsort(kind, kind="stable")
    for box, k in zip(hard_boxes[order], kind[order]):
        vis.draw_box(box, alpha=1.0, edge_color=rgb(colours[k]))
    for box in gt_boxes:
        vis.draw_box(box, alpha=1.0, edge_color=rgb(GT_COLOUR))
    return vis.get_output().get_image()[:, :, ::-1].copy()


class HardExampleSnapshot(HookBase):
    """At the given iterations, draws the hard set OHEM mines on fixed training images.

    Writes `<output_dir>/hard_examples_iter<N>.png` (the images side by side) and a JSON with
    the boxes and labels behind each picture.
    """

    def __init__(self, inputs, iterations, output_dir):
        self.inputs, self.iterations, self.output_dir = inputs, set(iterations), output_dir
        self.written = []

    @torch.no_grad()
    def mine(self):
        model = unwrap_ddp(self.trainer.model)
        head = model.roi_heads
        # It mines as training does (train mode), so a norm layer's running statistics move
        # and dropout draws random numbers. Both are put back: the picture must change neither
        # the model that is trained, saved and evaluated, nor the later steps' random draws.
        buffers = [(b, b.clone()) for b in model.buffers()]
        devices = [model.device] if model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                images = model.preprocess_image(self.inputs)
                features = model.backbone(images.tensor)
                proposals = model.select_proposals(self.inputs)
                targets = [x["instances"].to(model.device) for x in self.inputs]
                # A scratch storage: the miner's diagnostics must not mix into the step's.
                with EventStorage(self.trainer.iter):
                    hard = head.mine_hard_examples(features, proposals, targets)
        finally:
            for b, saved in buffers:
                b.copy_(saved)
        return hard, targets, head.num_classes

    def after_step(self):
        it = self.trainer.iter + 1
        if it not in self.iterations:
            return
        hard, targets, num_classes = self.mine()
        panels, record = [], []
        for x, h, t in zip(self.inputs, hard, targets):
            image = x["image"].permute(1, 2, 0).cpu().numpy().astype(np.uint8)
            boxes = h.proposal_boxes.tensor.cpu().numpy()
            is_fg = (h.gt_classes < num_classes).cpu().numpy()
            is_suspect = h.suspect_bg.cpu().numpy()
            gt = t.gt_boxes.tensor.cpu().numpy()
            panels.append(draw_hard_examples(image, gt, boxes, is_fg, is_suspect))
            record.append(
                {
                    "file_name": x.get("file_name"),
                    "gt_boxes": gt.tolist(),
                    "hard_boxes": boxes.tolist(),
                    "hard_is_fg": is_fg.tolist(),
                    "hard_is_suspect": is_suspect.tolist(),
                }
            )
        height = max(p.shape[0] for p in panels)
        panels = [
            cv2.copyMakeBorder(p, 0, height - p.shape[0], 0, 4, cv2.BORDER_CONSTANT) for p in panels
        ]
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, f"hard_examples_iter{it:05d}.png")
        cv2.imwrite(path, np.concatenate(panels, axis=1))
        with open(path[:-4] + ".json", "w") as f:
            json.dump({"iteration": it, "images": record}, f)
        self.written.append(path)
