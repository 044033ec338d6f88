"""The catalogue of bad inputs (docs/bad_inputs.md): each one, through the path a user takes
(Trainer, its data loaders, the config, train_net's checkpointer, the converter's CLI),
gives an error naming the file, image or key, or, where documented, a logged skip."""

import logging
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import FAST, REPO, run_train_net, toy_overrides

import ohem_d2
from ohem_d2.data.proposal_io import ProposalFileError, read_proposal_file, save_proposals_npz
from ohem_d2.data.toy import TOY_CLASS_NAMES, toy_proposal_file
from ohem_d2.engine import Trainer
from ohem_d2.engine.checkpoint import CheckpointMismatchError, SafeDetectionCheckpointer
from ohem_d2.engine.datasets import DatasetRegistrationError
from ohem_d2.engine.loaders import UnreadableImageError, proposal_mapper


@pytest.fixture
def make_cfg(small_toy_registered, tmp_path):
    def make(config="frcn.yaml", *opts):
        cfg = get_cfg()
        ohem_d2.add_ohem_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, "configs", "toy", config))
        cfg.merge_from_list([*toy_overrides(small_toy_registered), *FAST])
        cfg.merge_from_list(["OUTPUT_DIR", str(tmp_path / "out"), "SOLVER.MAX_ITER", 1, *opts])
        return cfg

    return make


@pytest.fixture
def register(small_toy_registered):
    """register(name, dicts): a dataset with the toy classes, removed afterwards."""
    names = []

    def reg(name, dicts):
        DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
        MetadataCatalog.get(name).set(thing_classes=list(TOY_CLASS_NAMES))
        names.append(name)
        return name

    yield reg
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


class _Records(logging.Handler):
    """Collects the messages of a logger (Detectron2's loggers do not propagate to pytest)."""

    def __init__(self, name):
        super().__init__(logging.DEBUG)
        self.messages, self.logger = [], logging.getLogger(name)

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.old_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)


def _toy_proposals(root):
    return read_proposal_file(toy_proposal_file(root, "trainval"))


def _train_loader_error(make_cfg, proposal_file, error=ProposalFileError):
    cfg = make_cfg("frcn.yaml", "DATASETS.PROPOSAL_FILES_TRAIN", (str(proposal_file),))
    with pytest.raises(error) as info:
        Trainer.build_train_loader(cfg)
    return str(info.value)


def _mutated(root, tmp_path, mutate):
    """The toy trainval proposals, changed by `mutate(ids, boxes, scores)`, as a new .npz."""
    p = _toy_proposals(root)
    ids, boxes, scores = list(p.ids), [b.copy() for b in p.boxes], [s.copy() for s in p.scores]
    mutate(ids, boxes, scores)
    path = str(tmp_path / "bad.npz")
    return save_proposals_npz(path, ids, boxes, scores, p.bbox_mode)


# ----------------------------------------------------------------------------- proposals


def test_01_missing_proposal_file(make_cfg, tmp_path):
    path = tmp_path / "nowhere.npz"
    message = _train_loader_error(make_cfg, path)
    assert str(path) in message and "does not exist" in message


def test_02_proposal_ids_do_not_match_dataset(make_cfg, small_toy_root):
    # The test split's file for the trainval split: no id in common.
    message = _train_loader_error(make_cfg, toy_proposal_file(small_toy_root, "test"))
    assert "ss_ohem_toy_test.npz" in message
    assert "has no proposals for 24 of the 24 images" in message and "'000001'" in message


def test_03_image_with_zero_proposals(make_cfg, small_toy_root, tmp_path):
    def empty_second(ids, boxes, scores):
        boxes[1], scores[1] = boxes[1][:0], scores[1][:0]

    path = _mutated(small_toy_root, tmp_path, empty_second)
    message = _train_loader_error(make_cfg, path)
    assert f"{path!r} has zero proposals for image '000002'" in message
    assert "000002.jpg" in message


@pytest.mark.parametrize(
    "value, expected",
    [
        ("inverted", "with x2 < x1 or y2 < y1 for image '000003'"),
        (np.nan, "NaN or infinite box coordinates for image '000003'"),
        (np.inf, "NaN or infinite box coordinates for image '000003'"),
        ("outside", "far outside image '000003'"),
    ],
    ids=["x2_lt_x1", "nan", "inf", "outside_image"],
)
def test_04_to_07_bad_box_coordinates(make_cfg, small_toy_root, tmp_path, value, expected):
    def corrupt_third(ids, boxes, scores):
        box = boxes[2][5]
        if value == "inverted":
            box[[0, 2]] = box[2] + 10, box[0]
        elif value == "outside":
            box[:] = [1000, 1000, 1100, 1100]
        else:
            box[2] = value

    path = _mutated(small_toy_root, tmp_path, corrupt_third)
    message = _train_loader_error(make_cfg, path)
    assert str(path) in message and expected in message


def test_08_npz_with_missing_keys(make_cfg, small_toy_root, tmp_path):
    with np.load(toy_proposal_file(small_toy_root, "trainval")) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "scores"}
    path = tmp_path / "no_scores.npz"
    np.savez(path, **arrays)
    message = _train_loader_error(make_cfg, path)
    assert str(path) in message and "lacks the key(s) ['scores']" in message


def test_09_npz_with_wrong_shapes(make_cfg, small_toy_root, tmp_path):
    with np.load(toy_proposal_file(small_toy_root, "trainval")) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["boxes"] = arrays["boxes"][:, :3]
    path = tmp_path / "three_coordinates.npz"
    np.savez(path, **arrays)
    message = _train_loader_error(make_cfg, path)
    assert str(path) in message and "key 'boxes' must be an (M, 4) float array" in message


def test_10_pickle_proposals_need_opt_in(make_cfg, small_toy_root, tmp_path):
    import pickle

    p = _toy_proposals(small_toy_root)
    path = tmp_path / "detectron2.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ids": p.ids, "boxes": p.boxes, "objectness_logits": p.scores}, f)
    message = _train_loader_error(make_cfg, path)
    assert str(path) in message and "DATASETS.PROPOSAL_FILES_TRUSTED" in message
    cfg = make_cfg("frcn.yaml", "DATASETS.PROPOSAL_FILES_TRAIN", (str(path),))
    cfg.DATASETS.PROPOSAL_FILES_TRUSTED = True  # the documented opt-in
    assert next(iter(Trainer.build_train_loader(cfg)))


def test_11_fast_rcnn_mat_of_another_image_set(small_toy_registered, tmp_path, capsys):
    scipy_io = pytest.importorskip("scipy.io")
    from ohem_d2.proposals import convert

    # VOC 2007 test ids: not the toy trainval images (same count, so ids decide).
    images = np.array([[f"{i:06d}"] for i in range(4952 - 24, 4952)], dtype=object)
    boxes = np.empty((24, 1), dtype=object)
    for i in range(24):
        boxes[i, 0] = np.array([[1.0, 1.0, 50.0, 60.0]])
    mat = tmp_path / "voc_2007_test.mat"
    scipy_io.savemat(mat, {"images": images, "boxes": boxes})
    out = tmp_path / "out.npz"
    argv = ["--from", "fast-rcnn-mat", "--in", str(mat), "--dataset", "ohem_toy_trainval"]
    assert convert.main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(mat) in err and "24 of its 24 image ids are not in the dataset" in err
    assert "another image set" in err and not out.exists()


# ----------------------------------------------------------------------------- datasets


def test_12_image_with_no_annotations_is_a_logged_skip(make_cfg, register):
    dicts = DatasetCatalog.get("ohem_toy_trainval")
    dicts[4] = dict(dicts[4], annotations=[])
    name = register("toy_one_unannotated", dicts)
    cfg = make_cfg("frcn.yaml", "DATASETS.TRAIN", (name,))
    with _Records("detectron2.data.build") as log:
        assert next(iter(Trainer.build_train_loader(cfg)))
    assert "Removed 1 images with no usable annotations. 23 images left." in log.messages

    all_empty = register("toy_unannotated", [dict(d, annotations=[]) for d in dicts])
    cfg = make_cfg("frcn.yaml", "DATASETS.TRAIN", (all_empty,))
    with pytest.raises(ValueError, match=r"\['toy_unannotated'\] have no image with annotations"):
        Trainer.build_train_loader(cfg)


def _truncated_copy(path, tmp_path):
    data = open(path, "rb").read()
    out = tmp_path / ("truncated_" + os.path.basename(path))
    out.write_bytes(data[: len(data) // 3])
    return str(out)


def test_13_corrupt_jpeg_skipped_in_training_named_at_test_time(make_cfg, register, tmp_path):
    dicts = DatasetCatalog.get("ohem_toy_trainval")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg at all" * 10)
    # Every image but four is unreadable, so that a few batches surely meet some.
    bad = [dict(d, file_name=_truncated_copy(d["file_name"], tmp_path)) for d in dicts[:12]]
    bad += [dict(d, file_name=str(garbage)) for d in dicts[12:20]]
    name = register("toy_corrupt_jpegs", bad + dicts[20:])
    good = {d["file_name"] for d in dicts[20:]}

    cfg = make_cfg("frcn.yaml", "DATASETS.TRAIN", (name,))
    with _Records("ohem_d2.engine.loaders") as log:
        batches = [b for b, _ in zip(Trainer.build_train_loader(cfg), range(3))]
    assert {r["file_name"] for b in batches for r in b} <= good
    skips = [m for m in log.messages if "Skipped; training uses another image" in m]
    assert skips and all("Cannot read image '" in m for m in skips)
    assert f"({len(skips)} unreadable image(s) skipped so far" in skips[-1]
    assert any("truncated" in m for m in skips) or any(str(garbage) in m for m in skips)

    # At test time every image counts: the error names the file.
    mapper = proposal_mapper(cfg, False)
    with pytest.raises(UnreadableImageError, match=f"Cannot read image '{bad[0]['file_name']}'"):
        mapper(dict(bad[0], proposal_boxes=np.zeros((1, 4), np.float32), proposal_bbox_mode=0))

    # A dataset of unreadable images fails with a clear error, not an endless retry.
    name = register("toy_all_corrupt", [dict(d, file_name=str(garbage)) for d in dicts])
    cfg = make_cfg("frcn.yaml", "DATASETS.TRAIN", (name,))
    with pytest.raises(UnreadableImageError, match="24 images in a row could not be read"):
        next(iter(Trainer.build_train_loader(cfg)))


def test_14_unknown_dataset_name(make_cfg, small_toy_root, tmp_path):
    cfg = make_cfg("frcn.yaml", "DATASETS.TRAIN", ("voc_2077_trainval",))
    with pytest.raises(KeyError, match="Dataset 'voc_2077_trainval' is not registered"):
        Trainer.build_train_loader(cfg)
    # Detectron2 looks DATASETS.TEST up only when it evaluates, after training: the trainer
    # builds.
    Trainer(make_cfg("frcn.yaml", "DATASETS.TEST", ("my_val",)))
    # train_net.py refuses it before the launch, naming the key and how to register one.
    args = ["--config-file", "configs/toy/frcn.yaml", *toy_overrides(small_toy_root), *FAST]
    args += ["DATASETS.TEST", "('my_val',)", "OUTPUT_DIR", tmp_path / "run"]
    result = run_train_net(args, os.path.dirname(small_toy_root))
    assert result.returncode != 0
    assert (
        "ERROR: DATASETS.TEST names dataset 'my_val', which is not registered. Register your "
        "own with train_net.py --register-coco NAME JSON IMAGE_ROOT (COCO format) or "
        "--register-voc NAME DIRNAME SPLIT CLASSES" in result.stdout
    ), result.stdout[-3000:]
    assert "Starting training" not in result.stdout
    assert "Traceback" not in result.stdout


def _train_net():
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import train_net

    return train_net


@pytest.mark.parametrize("eval_only", [False, True])
def test_23_dataset_without_its_files(catalog_restored, monkeypatch, eval_only):
    """A zoo config's COCO sets (registered by Detectron2 whether COCO is there or not): the
    LazyConfig, for the train set, or with --eval-only, for the test set alone."""
    train_net = _train_net()
    loader, split = ("test", "val") if eval_only else ("train", "train")
    json_file = MetadataCatalog.get(f"coco_2017_{split}").json_file
    if os.path.exists(json_file):
        pytest.skip(f"COCO is on this machine ({json_file})")
    config = os.path.join(REPO, "configs", "lazy", "mask_rcnn_fpn_ohem.py")
    argv = ["train_net.py", *["--eval-only"] * eval_only, "--config-file", config]
    monkeypatch.setattr(sys, "argv", [*argv, "train.device=cpu"])
    expected = (
        f"dataloader.{loader}.dataset.names names dataset 'coco_2017_{split}', whose "
        f"annotation file {json_file} does not exist .* register it with --register-coco NAME "
        f"JSON IMAGE_ROOT .* and name it in dataloader.{loader}.dataset.names"
    )
    with pytest.raises(DatasetRegistrationError, match=expected):
        train_net.check_setup(train_net.parse_args())


def test_15_empty_dataset(make_cfg, register):
    name = register("toy_empty", [])
    cfg = make_cfg("frcn.yaml", "DATASETS.TRAIN", (name,))
    with pytest.raises(ValueError, match="Dataset 'toy_empty' is empty"):
        Trainer.build_train_loader(cfg)


def test_16_one_proposal_file_per_dataset(make_cfg, small_toy_root):
    train = toy_proposal_file(small_toy_root, "trainval")
    cfg = make_cfg("frcn.yaml", "DATASETS.PROPOSAL_FILES_TRAIN", (train, train))
    with pytest.raises(ValueError, match=r"one proposal file per dataset: got 2 file\(s\)"):
        Trainer.build_train_loader(cfg)


# ----------------------------------------------------------------------------- config


def test_17_unknown_ohem_config_value(make_cfg):
    cfg = make_cfg("ohem.yaml", "MODEL.ROI_HEADS.OHEM.HARDNESS", "box")
    with pytest.raises(ValueError, match=r"MODEL.ROI_HEADS.OHEM.HARDNESS must be one of .*'box'"):
        Trainer.build_model(cfg)


def test_18_misspelled_config_key(make_cfg):
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.ROI_HEADS.OHEM.HARDNES"):
        make_cfg("ohem.yaml", "MODEL.ROI_HEADS.OHEM.HARDNES", "cls")


@pytest.mark.parametrize("value", [0, -64])
def test_19_batch_size_per_image_not_positive(make_cfg, value):
    cfg = make_cfg("ohem.yaml", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", value)
    with pytest.raises(ValueError, match=f"BATCH_SIZE_PER_IMAGE .* must be > 0, got {value}"):
        Trainer.build_model(cfg)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "config, expected",
    [
        ("frcn.yaml", r"Loss became infinite or NaN at iteration="),
        ("ohem.yaml", r"OHEM readonly pass: non-finite loss .* at iteration \d+"),
    ],
)
def test_20_nan_loss_stops_training(make_cfg, config, expected):
    # A learning rate that makes the weights overflow within a few iterations.
    cfg = make_cfg(config, "SOLVER.BASE_LR", 1e30, "SOLVER.MAX_ITER", 6, "DATASETS.TEST", ())
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    with pytest.raises(FloatingPointError, match=expected):
        trainer.train()
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))


# ----------------------------------------------------------------------------- checkpoints


def _catalogue_row(number):
    """The quoted messages of row `number` of docs/bad_inputs.md."""
    with open(os.path.join(REPO, "docs", "bad_inputs.md")) as f:
        row = next(line for line in f if line.startswith(f"| {number} |"))
    return re.findall(r"`([^`]+)`", row)


def _as_documented(message, quoted):
    """True if `message` is one of the quoted ones, 'PATH' standing for any path and
    '[...X...]' for any text."""
    for q in quoted:
        pattern = ".*".join(map(re.escape, re.split(r"PATH|\[\.\.\.\w+\.\.\.\]", q)))
        if re.fullmatch(pattern, message):
            return True
    return False


@pytest.fixture
def four_class_checkpoint(make_cfg, tmp_path):
    model = Trainer.build_model(make_cfg("frcn.yaml"))
    path = tmp_path / "four_classes.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_21_checkpoint_with_other_number_of_classes(
    make_cfg, four_class_checkpoint, small_toy_root, tmp_path
):
    cfg = make_cfg("frcn.yaml", "MODEL.ROI_HEADS.NUM_CLASSES", 3)
    expected = (
        r"Checkpoint '.*' does not fit .*"
        r"'roi_heads.box_predictor.cls_score.weight' has shape \(5, 256\) in the checkpoint "
        r"but \(4, 256\) in the model .*NUM_CLASSES"
    )
    saved = torch.load(four_class_checkpoint, weights_only=True)["model"]
    # Initialising a run from MODEL.WEIGHTS (fine-tuning on another label set), as
    # Detectron2 does: the predictor's tensors of another shape are skipped and logged, the
    # rest is loaded.
    cfg.MODEL.WEIGHTS = four_class_checkpoint
    trainer = Trainer(cfg)
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    trainer.checkpointer.logger.addHandler(handler)
    try:
        trainer.resume_or_load(resume=False)
    finally:
        trainer.checkpointer.logger.removeHandler(handler)
    state = trainer.model.state_dict()
    skipped = {k for k, v in saved.items() if v.shape != state[k].shape}
    assert skipped == {
        f"roi_heads.box_predictor.{layer}.{p}"
        for layer in ("cls_score", "bbox_pred")
        for p in ("weight", "bias")
    }
    for key in skipped:
        assert any(f"Skip loading parameter '{key}'" in m for m in logged), logged
    # The catalogue quotes fvcore's message for the first key, and the strict paths' error.
    documented = _catalogue_row(21)
    assert any(_as_documented(m, documented) for m in logged), (documented, logged)
    assert all(torch.equal(saved[k], state[k]) for k in saved if k not in skipped)
    # train_net.py --eval-only loads strictly: a skipped predictor would score at random.
    args = ["--config-file", "configs/toy/frcn.yaml", "--eval-only"]
    args += [*toy_overrides(small_toy_root), *FAST, "MODEL.ROI_HEADS.NUM_CLASSES", 3]
    args += ["MODEL.WEIGHTS", four_class_checkpoint, "OUTPUT_DIR", tmp_path / "eval"]
    result = run_train_net(args, os.path.dirname(small_toy_root))
    assert result.returncode != 0
    # The traceback's last line (ohem_d2.engine.checkpoint.CheckpointMismatchError: ...).
    (refused,) = re.findall(r"\bCheckpointMismatchError: .*$", result.stdout, re.M)
    assert re.search(expected, refused), result.stdout[-3000:]
    assert _as_documented(refused, documented), (refused, documented)
    assert "Start inference" not in result.stdout
    # --resume of a run whose last checkpoint does not fit refuses, naming the key.
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    shutil.copy(four_class_checkpoint, os.path.join(cfg.OUTPUT_DIR, "model_0000009.pth"))
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
        f.write("model_0000009.pth")
    with pytest.raises(CheckpointMismatchError, match=expected):
        Trainer(cfg).resume_or_load(resume=True)


def test_24_training_from_no_weights_is_said(make_cfg, four_class_checkpoint, tmp_path):
    documented = _catalogue_row(24)

    def warned(resume=False, *opts):
        trainer = Trainer(make_cfg("frcn.yaml", *opts))
        with _Records("detectron2.trainer") as log:
            trainer.resume_or_load(resume=resume)
        return any(_as_documented(m, documented) for m in log.messages)

    assert warned(False, "MODEL.WEIGHTS", "")
    # --resume without a checkpoint to resume starts from MODEL.WEIGHTS too.
    assert warned(True, "MODEL.WEIGHTS", "")
    assert not warned(False, "MODEL.WEIGHTS", four_class_checkpoint)
    # A run resumed from its last checkpoint has weights.
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    shutil.copy(four_class_checkpoint, os.path.join(out, "model_0000009.pth"))
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000009.pth")
    assert not warned(True, "MODEL.WEIGHTS", "", "OUTPUT_DIR", out)


def test_22_checkpoint_of_another_architecture(make_cfg, four_class_checkpoint):
    # A narrow-VGG checkpoint for the full-width VGG16: every conv differs.
    cfg = make_cfg("frcn.yaml", "MODEL.VGG.WIDTH_MULT", 0.5)
    model = Trainer.build_model(cfg)
    with pytest.raises(CheckpointMismatchError, match=r"'backbone.conv1.conv1_1.weight' .* more"):
        SafeDetectionCheckpointer(model).load(four_class_checkpoint)
    # ... while the matching config loads it.
    model = Trainer.build_model(make_cfg("frcn.yaml"))
    SafeDetectionCheckpointer(model).load(four_class_checkpoint)
