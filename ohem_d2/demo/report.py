"""The demo's report from the runs' folders: the side-by-side table, the all-RoI loss curves
(roi_loss.png, paper Fig. 3) and the test images with each column's detections
(detections.png)."""

import json
import os

from tabulate import tabulate

from .run import METHODS, PROBE_IMAGES, RECOMMENDED_DIR

# detections.png draws the detections with at least this score.
DRAW_SCORE = 0.5
# BGR colours per class index, for detections.png.
CLASS_COLOURS = [(0, 0, 255), (255, 255, 255), (0, 200, 0), (255, 0, 255)]


def read_summaries(output_dir, methods=tuple(METHODS)):
    """Each evaluation's summary.json in a demo --output-dir, in the report's order (FRCN,
    paper OHEM, recommended OHEM; those of `methods` that are there), each with the folder it
    came from as "folder". The runs write them; the report, the studies' tables and
    benchmarks.gpu_check read them here."""
    summaries = []
    for method in methods:
        for folder in (method, RECOMMENDED_DIR) if method == "ohem" else (method,):
            path = os.path.join(output_dir, folder, "summary.json")
            if os.path.isfile(path):
                with open(path) as f:
                    summaries.append({**json.load(f), "folder": folder})
    return summaries


def _optional(value, fmt):
    return "-" if value is None else fmt.format(value)


def column_label(summary):
    """The table's and detections.png's name of a summary's column."""
    return METHODS[summary["method"]] + (" (recommended)" if summary.get("recommended") else "")


def format_table(summaries):
    """The side-by-side table (Markdown) of the methods' summaries."""
    rows = [
        ("mAP50, all-point (%)", lambda s: f"{s['voc_AP50_allpoint']:.1f}"),
        ("mAP50, VOC07 11-point (%)", lambda s: f"{s['voc_AP50_11point']:.1f}"),
    ]
    for name in summaries[0]["per_class_AP50_allpoint"]:
        rows.append(
            (
                f"AP50 {name}, all-point (%)",
                lambda s, n=name: f"{s['per_class_AP50_allpoint'][n]:.1f}",
            )
        )
    rows += [
        ("COCO AP (%)", lambda s: f"{s['coco_AP']:.1f}"),
        ("COCO AP50 (%)", lambda s: f"{s['coco_AP50']:.1f}"),
        ("COCO AP75 (%)", lambda s: f"{s['coco_AP75']:.1f}"),
        ("detections per image (mean)", lambda s: f"{s['mean_detections_per_image']:.1f}"),
        (
            "at score >= 0.5: precision / recall / F1",
            lambda s: "{:.2f} / {:.2f} / {:.2f}".format(
                s["precision@0.5"], s["recall@0.5"], s["f1@0.5"]
            ),
        ),
        ("detections per image at score >= 0.5", lambda s: f"{s['detections_per_image@0.5']:.1f}"),
        ("D-ECE (detection calibration error)", lambda s: _optional(s["d_ece"], "{:.3f}")),
        (
            "lowest kept score (median over images)",
            lambda s: _optional(s["median_lowest_kept_score"], "{:.3f}"),
        ),
        (
            "final loss over all RoIs (fg + bg)",
            lambda s: "{mean_roi_loss:.3f} ({fg_part:.3f} + {bg_part:.3f})".format(
                **s["final_roi_loss"]
            ),
        ),
        ("s/iter (median)", lambda s: f"{s['s_per_iter']:.3f}"),
        ("peak memory (MB RSS)", lambda s: f"{s['peak_rss_mb']:.0f}"),
    ]
    if any(s.get("peak_cuda_mb") is not None for s in summaries):
        rows.append(("peak CUDA memory (MB)", lambda s: f"{s['peak_cuda_mb']:.0f}"))
    rows += [
        ("memory allocator", lambda s: s["allocator"]),
        ("device", lambda s: s["device"]),
        ("threads", lambda s: str(s.get("threads", "-"))),
    ]
    headers = ["metric"] + [column_label(s) for s in summaries]
    cells = [[label] + [cell(s) for s in summaries] for label, cell in rows]
    return tabulate(cells, headers, tablefmt="github", disable_numparse=True)


def plot_roi_loss(output_dir, methods):
    """Both methods' probe curves (total, foreground and background parts) in one PNG;
    returns the data plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for k, method in enumerate(methods):
        with open(os.path.join(output_dir, method, "roi_loss_probe.json")) as f:
            curve = json.load(f)
        data[method] = curve
        colour = f"C{k}"
        it = curve["iteration"]
        ax.plot(it, curve["mean_roi_loss"], color=colour, label=f"{METHODS[method]}: all RoIs")
        ax.plot(it, curve["fg_part"], color=colour, ls="--", label="  foreground part")
        ax.plot(it, curve["bg_part"], color=colour, ls=":", label="  background part")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean loss per RoI (all RoIs)")
    ax.set_title(
        f"Training loss over all RoIs of {PROBE_IMAGES} fixed training images (paper Fig. 3)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "roi_loss.png"))
    plt.close(fig)
    with open(os.path.join(output_dir, "roi_loss.json"), "w") as f:
        json.dump(data, f)
    return data


def draw_detections(output_dir, panels, class_names):
    """detections.png: one row per test image, one panel per (folder, title) of `panels`
    (GT yellow, detections with score >= DRAW_SCORE coloured by class, with class and
    score)."""
    import cv2
    import numpy as np
    from detectron2.utils.visualizer import Visualizer

    from .hooks import GT_COLOUR, rgb

    per_method = {}
    for method, _ in panels:
        with open(os.path.join(output_dir, method, "detections.json")) as f:
            per_method[method] = json.load(f)
    rows = []
    for k in range(len(per_method[panels[0][0]])):
        row = []
        for method, name in panels:
            rec = per_method[method][k]
            vis = Visualizer(cv2.imread(rec["file_name"])[:, :, ::-1])
            for box in rec["gt_boxes"]:
                vis.draw_box(box, alpha=1.0, edge_color=rgb(GT_COLOUR))
            for box, score, cls in zip(rec["boxes"], rec["scores"], rec["classes"]):
                if score < DRAW_SCORE:
                    continue
                colour = rgb(CLASS_COLOURS[cls % len(CLASS_COLOURS)])
                vis.draw_box(box, alpha=1.0, edge_color=colour)
                label = f"{class_names[cls]} {score:.2f}"
                vis.draw_text(
                    label, (box[0] + 2, box[1]), color=colour, horizontal_alignment="left"
                )
            title = f"{name}: score >= {DRAW_SCORE}, ground truth yellow"
            vis.draw_text(title, (6, 4), color=rgb(GT_COLOUR), horizontal_alignment="left")
            img = vis.get_output().get_image()[:, :, ::-1]
            row.append(cv2.copyMakeBorder(img, 2, 2, 2, 2, cv2.BORDER_CONSTANT))
        rows.append(np.concatenate(row, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [cv2.copyMakeBorder(r, 0, 0, 0, width - r.shape[1], cv2.BORDER_CONSTANT) for r in rows]
    path = os.path.join(output_dir, "detections.png")
    cv2.imwrite(path, np.concatenate(rows, axis=0))
    return path
