"""Class make-up of the RoIs each method trains on, against all RoIs, on BCCD training images.

    python -m studies.hard_set_composition --run-dir output/demo --images 40

Loads the demo's two final models (<run-dir>/{frcn,ohem}/model_final.pth), labels all RoIs of
the first `--images` training images that contain a platelet, and counts per class (and
background) the RoIs among ALL RoIs, in FRCN's sampled minibatch (its own sampler) and in
OHEM's hard set (its own miner, readonly pass as in training). Prints a Markdown table.

    python -m studies.hard_set_composition --run-dir output/demo \
        --ohem-run-dir output/test_cls_s0 --ohem-opts MODEL.ROI_HEADS.OHEM.HARDNESS cls

takes OHEM's model from another run (a `--methods ohem` run of a variant) and mines with that
run's options, so the variant's hard set is the one counted.
"""

import argparse
import collections
import os

import torch
from detectron2.utils.events import EventStorage

from ohem_d2.demo import build_demo_cfg, probe_inputs
from ohem_d2.demo.hooks import label_all_rois
from ohem_d2.engine import Trainer, register_project_datasets
from ohem_d2.engine.checkpoint import SafeDetectionCheckpointer
from ohem_d2.modeling.ohem import readonly_head
from studies.table import markdown


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", default="output/demo")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ohem-run-dir", default=None, help="OHEM's run (default: --run-dir)")
    parser.add_argument(
        "--ohem-opts", nargs="*", default=[], help="KEY VALUE pairs of that run's OHEM options"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    register_project_datasets()
    counts, called = {}, {}
    for method in ("frcn", "ohem"):
        if method == "ohem":
            run_dir, ohem_opts = args.ohem_run_dir or args.run_dir, args.ohem_opts
        else:
            run_dir, ohem_opts = args.run_dir, []
        cfg = build_demo_cfg("bccd", method, run_dir, 450, 0, "cpu", ohem_opts)
        model = Trainer.build_model(cfg)
        SafeDetectionCheckpointer(model).load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
        model.train()
        inputs = [x for x in probe_inputs(cfg, 300) if (x["instances"].gt_classes == 2).any()]
        inputs = inputs[: args.images]
        with torch.no_grad(), EventStorage():
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            proposals = model.select_proposals(inputs)
            targets = [x["instances"] for x in inputs]
            head = model.roi_heads
            everything = label_all_rois([p for p in proposals], targets, head.num_classes)
            if method == "ohem":
                trained = head.mine_hard_examples(features, proposals, targets)
            else:
                trained = head.label_and_sample_proposals(proposals, targets)
            # What the model calls the platelets' own ground-truth boxes (eval mode: no dropout).
            model.eval()
            gt_boxes = [t.gt_boxes[t.gt_classes == 2] for t in targets]
            feats = [features[f] for f in head.in_features]
            scores = readonly_head(head)(feats, gt_boxes)[0]
            called[method] = collections.Counter(scores.argmax(1).tolist())
            model.train()
        for key, sets in (("all RoIs", everything), (method, trained)):
            c = collections.Counter()
            for s in sets:
                c.update(s.gt_classes.tolist())
            counts[key] = c
    classes = ["RBC", "WBC", "Platelets", "background"]
    print(f"{args.images} BCCD training images with a platelet; RoIs per class (share):\n")
    rows = []
    for key in ("all RoIs", "frcn", "ohem"):
        c = counts[key]
        total = sum(c.values())
        label = {"frcn": "FRCN minibatch", "ohem": "OHEM hard set"}.get(key, key)
        rows.append([label] + [f"{c[k]} ({100 * c[k] / total:.1f} %)" for k in range(4)])
    print(markdown(rows, ["RoIs"] + classes))

    print("\nWhat each final model calls the platelets' ground-truth boxes (argmax class):\n")
    rows = [[method] + [called[method][k] for k in range(4)] for method in ("frcn", "ohem")]
    print(markdown(rows, ["model"] + classes))


if __name__ == "__main__":
    main()
