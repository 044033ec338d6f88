"""The OHEM heads dropped into Detectron2's own model-zoo configs (YAML and LazyConfig),
trained and evaluated through train_net.py on a COCO-format dataset registered from the
command line; and the clear errors of train_net.py at the usual mistakes."""

import json
import os
import re

import pytest
from detectron2 import model_zoo
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import load_voc_instances
from helpers import DEVICE, REPO, run_train_net

from ohem_d2.data.proposal_io import read_proposal_file, save_proposals_npz
from ohem_d2.data.toy import TOY_CLASS_NAMES, toy_proposal_file
from ohem_d2.engine.datasets import DatasetRegistrationError, register_user_datasets
from ohem_d2.engine.distributed import DistributedSetupError, check_devices

# R50-FPN on the tests' device with random weights: tiny images and few RoIs, two iterations.
SMALL = [
    "MODEL.DEVICE", DEVICE,
    "MODEL.WEIGHTS", "",
    "MODEL.ROI_HEADS.NUM_CLASSES", len(TOY_CLASS_NAMES),
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 200,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", 192,
    "INPUT.MIN_SIZE_TEST", 128,
    "INPUT.MAX_SIZE_TEST", 192,
    "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.BASE_LR", 0.001,
    "SOLVER.MAX_ITER", 2,
    "SOLVER.CHECKPOINT_PERIOD", 1000,
    "DATALOADER.NUM_WORKERS", 0,
]  # fmt: skip


def _voc_to_coco(root, split, json_path, with_empty=0):
    """The toy split as COCO json (int ids; each box also as a rectangle polygon mask), plus
    `with_empty` copies of its first images with no annotation at all."""
    dicts = load_voc_instances(root, split, list(TOY_CLASS_NAMES))
    images, annotations = [], []
    for i, d in enumerate(dicts + dicts[:with_empty]):
        file_name = os.path.relpath(d["file_name"], os.path.join(root, "JPEGImages"))
        images.append(
            {"id": i + 1, "file_name": file_name, "height": d["height"], "width": d["width"]}
        )  # noqa: E501
        if i >= len(dicts):
            continue
        for a in d["annotations"]:
            x0, y0, x1, y1 = (float(v) for v in a["bbox"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": a["category_id"] + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                }
            )
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(TOY_CLASS_NAMES)]
    with open(json_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return [str(d["image_id"]) for d in dicts + dicts[:with_empty]]


@pytest.fixture(scope="module")
def toy_coco(small_toy_root, tmp_path_factory):
    """The small toy dataset in COCO format (train with 2 unannotated images) and its
    selective-search proposals re-keyed by the COCO ids."""
    out = tmp_path_factory.mktemp("toy_coco")
    files = {}
    for split, coco_split, empty in (("trainval", "train", 2), ("test", "val", 0)):
        path = str(out / f"{coco_split}.json")
        voc_ids = _voc_to_coco(small_toy_root, split, path, with_empty=empty)
        proposals = read_proposal_file(toy_proposal_file(small_toy_root, split))
        by_id = dict(zip(proposals.ids, zip(proposals.boxes, proposals.scores)))
        npz = save_proposals_npz(
            str(out / f"proposals_{coco_split}.npz"),
            range(1, len(voc_ids) + 1),
            [by_id[i][0] for i in voc_ids],
            [by_id[i][1] for i in voc_ids],
        )
        files[coco_split] = (path, npz)
    image_root = os.path.join(small_toy_root, "JPEGImages")
    register = []
    for split, (path, _) in files.items():
        register += ["--register-coco", f"toy_coco_{split}", path, image_root]
    return {"register": register, "files": files, "image_root": image_root}


def _run_zoo(toy_coco, tmp_path, config_file, *extra):
    args = [*toy_coco["register"], "--config-file", config_file, *SMALL]
    args += ["DATASETS.TRAIN", "('toy_coco_train',)", "DATASETS.TEST", "('toy_coco_val',)"]
    args += ["OUTPUT_DIR", str(tmp_path), *extra]
    result = run_train_net(args, str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _tasks(stdout):
    """The tasks of Detectron2's final copypaste block and their AP values."""
    tasks = {}
    for task, values in re.findall(
        r"copypaste: Task: (\w+)\n.*?copypaste: [A-Za-z0-9,]+\n.*?copypaste: ([-0-9.,naN]+)",
        stdout,
        re.S,
    ):  # noqa: E501
        tasks[task] = [float(v) for v in values.split(",")]
    return tasks


def _mined_rois(tmp_path, prefix=""):
    with open(os.path.join(tmp_path, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r[f"{prefix}ohem/num_candidates"] for r in rows if f"{prefix}ohem/num_candidates" in r]


@pytest.mark.parametrize(
    "zoo_config, head, tasks",
    [
        ("COCO-Detection/fast_rcnn_R_50_FPN_1x.yaml", "OHEMROIHeads", {"bbox"}),
        ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "OHEMROIHeads", {"bbox"}),
        ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", "OHEMROIHeads", {"bbox", "segm"}),
        ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", "OHEMCascadeROIHeads", {"bbox", "segm"}),
    ],
)
def test_model_zoo_config_with_ohem_head_trains_and_evaluates(
    toy_coco, tmp_path, zoo_config, head, tasks
):
    extra = ["MODEL.ROI_HEADS.NAME", head, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False]
    if "fast_rcnn" in zoo_config:
        (_, train_npz), (_, val_npz) = toy_coco["files"]["train"], toy_coco["files"]["val"]
        extra += ["DATASETS.PROPOSAL_FILES_TRAIN", f"('{train_npz}',)"]
        extra += ["DATASETS.PROPOSAL_FILES_TEST", f"('{val_npz}',)"]
    stdout = _run_zoo(toy_coco, tmp_path, model_zoo.get_config_file(zoo_config), *extra)
    # The evaluator follows the model: segm AP for Mask R-CNN, bbox AP always.
    assert set(_tasks(stdout)) == tasks, stdout[-3000:]
    prefix = "stage0/" if "Cascade" in head else ""
    assert _mined_rois(tmp_path, prefix), "no OHEM scalars in metrics.json"


def _run_lazy_mask_rcnn(toy_coco, tmp_path, overrides):
    """train_net.py on configs/lazy/mask_rcnn_fpn_ohem.py, small, on the toy COCO set."""
    overrides = [
        *overrides,
        "dataloader.train.dataset.names=toy_coco_train",
        "dataloader.test.dataset.names=toy_coco_val",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        # The toy images are ~200 px: no resizing.
        "dataloader.train.mapper.augmentations=[]",
        "dataloader.test.mapper.augmentations=[]",
        "model.roi_heads.num_classes=4",
        "model.proposal_generator.post_nms_topk=[200,100]",
        "model.roi_heads.batch_size_per_image=64",
        "optimizer.lr=0.001",
    ]
    config = os.path.join(REPO, "configs", "lazy", "mask_rcnn_fpn_ohem.py")
    return run_train_net(
        [*toy_coco["register"], "--config-file", config, *overrides], str(tmp_path)
    )


def test_lazy_config_mask_rcnn_with_ohem_head(toy_coco, tmp_path):
    overrides = [
        f"train.device={DEVICE}",
        "train.max_iter=2",
        "train.eval_period=0",
        f"train.output_dir={tmp_path}",
    ]
    result = _run_lazy_mask_rcnn(toy_coco, tmp_path, overrides)
    assert result.returncode == 0, result.stdout[-4000:]
    # The config's train.init_checkpoint is empty: the run says it trains from scratch.
    assert "train.init_checkpoint is empty: training starts from random initialisation" in (
        result.stdout
    )
    # COCOEvaluator finds the tasks from the predictions: boxes and masks.
    assert set(_tasks(result.stdout)) == {"bbox", "segm"}, result.stdout[-3000:]
    # The miner's batch size is linked to the head's: 64 hard RoIs per image.
    assert _mined_rois(tmp_path)
    with open(os.path.join(tmp_path, "config.yaml")) as f:
        saved = f.read()
    assert "OHEMROIHeads" in saved and "HardExampleMiner" in saved


def test_lazy_config_miner_batch_size_follows_the_head():
    from detectron2.config import LazyConfig, instantiate

    for name in ("mask_rcnn_fpn_ohem.py", "cascade_mask_rcnn_fpn_ohem.py"):
        cfg = LazyConfig.load(os.path.join(REPO, "configs", "lazy", name))
        cfg = LazyConfig.apply_overrides(cfg, ["model.roi_heads.batch_size_per_image=77"])
        roi_heads = instantiate(cfg.model.roi_heads)
        assert roi_heads.miner.batch_size_per_image == 77


def test_user_voc_dataset_registration(small_toy_root):
    classes = ",".join(TOY_CLASS_NAMES)
    try:
        (name,) = register_user_datasets(voc=[("my_voc_test", small_toy_root, "test", classes)])
        assert name == "my_voc_test"
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 12
        assert MetadataCatalog.get(name).thing_classes == list(TOY_CLASS_NAMES)
        # Again, with the same files (every launched process registers): a no-op.
        register_user_datasets(voc=[("my_voc_test", small_toy_root, "test", classes)])
        with pytest.raises(DatasetRegistrationError, match="already registered"):
            register_user_datasets(voc=[("my_voc_test", small_toy_root, "trainval", classes)])
    finally:
        DatasetCatalog.remove("my_voc_test")
        MetadataCatalog.remove("my_voc_test")


def test_user_dataset_registration_errors(tmp_path, small_toy_root):
    with pytest.raises(DatasetRegistrationError, match="does not exist"):
        register_user_datasets(coco=[("x", str(tmp_path / "missing.json"), str(tmp_path))])
    with pytest.raises(DatasetRegistrationError, match="VOC image set"):
        register_user_datasets(voc=[("y", str(tmp_path), "train", "a,b")])
    with pytest.raises(DatasetRegistrationError, match="no class names"):
        register_user_datasets(voc=[("z", small_toy_root, "test", " , ")])
    # Detectron2's builtin names are taken.
    with pytest.raises(DatasetRegistrationError, match="already registered"):
        register_user_datasets(voc=[("voc_2007_test", small_toy_root, "test", "voc")])


def test_train_net_bad_dataset_argument_fails_before_launch(tmp_path):
    missing = str(tmp_path / "nothing.json")
    args = ["--register-coco", "mine", missing, str(tmp_path)]
    args += ["--config-file", "configs/toy/frcn.yaml", "MODEL.DEVICE", "cpu"]
    result = run_train_net(args, str(tmp_path))
    assert result.returncode != 0
    assert f"ERROR: dataset 'mine': COCO annotation file {missing} does not exist" in result.stdout


# ----------------------------------------------------------------------------- devices


def test_cuda_config_without_gpu_is_refused_before_launch(tmp_path):
    args = ["--config-file", "configs/toy/frcn.yaml", "--num-gpus", "2", "MODEL.DEVICE", "cuda"]
    # no_gpu: a machine without a GPU, also where the tests run on one.
    result = run_train_net(args, str(tmp_path), no_gpu=True)
    assert result.returncode != 0
    assert "has no usable CUDA GPU" in result.stdout
    assert "`MODEL.DEVICE cpu`" in result.stdout
    assert "Traceback" not in result.stdout


def test_lazy_config_without_gpu_names_train_device(tmp_path):
    # Detectron2's common/train.py says device="cuda".
    config = os.path.join(REPO, "configs", "lazy", "mask_rcnn_fpn_ohem.py")
    result = run_train_net(["--config-file", config], str(tmp_path), no_gpu=True)
    assert result.returncode != 0
    assert "`train.device=cpu`" in result.stdout
    assert "Traceback" not in result.stdout


def test_check_devices_rules():
    kw = dict(world_size=1, ims_per_batch=2, cuda_available=False, cuda_device_count=0)
    assert (
        check_devices("cpu", num_processes=1, **kw)
        == "1 CPU process(es) (single process): MODEL.DEVICE cpu"
    )  # noqa: E501
    kw2 = dict(kw, world_size=2)
    assert check_devices("cpu", num_processes=2, **kw2).startswith("2 CPU process(es) (gloo)")
    with pytest.raises(DistributedSetupError, match="no usable CUDA GPU"):
        check_devices("cuda", num_processes=1, **kw)
    with pytest.raises(DistributedSetupError, match=r"IMS_PER_BATCH \(2\) must be divisible .*\(4"):
        check_devices("cpu", num_processes=4, **dict(kw, world_size=4))
    gpus = dict(kw, cuda_available=True, cuda_device_count=2)
    assert check_devices("cuda", num_processes=2, **dict(gpus, world_size=2)).startswith("2 CUDA")
    with pytest.raises(DistributedSetupError, match="this machine has 2 CUDA GPU"):
        check_devices("cuda", num_processes=4, **dict(gpus, world_size=4, ims_per_batch=4))
    with pytest.raises(DistributedSetupError, match="NCCL"):
        check_devices("cpu", num_processes=2, **dict(gpus, world_size=2))


# ----------------------------------------------------------------------------- configs


def test_configs_ship_inside_the_package():
    import ohem_d2
    from ohem_d2.model_zoo import CONFIG_DIR, get_config, get_config_file

    assert CONFIG_DIR == os.path.join(os.path.dirname(ohem_d2.__file__), "configs")
    assert os.path.realpath(os.path.join(REPO, "configs")) == os.path.realpath(CONFIG_DIR)
    cfg = get_config("bccd/ohem.yaml")
    assert cfg.MODEL.ROI_HEADS.NAME == "OHEMROIHeads"
    assert cfg.MODEL.ROI_HEADS.OHEM.NMS_THRESH == 0.7
    assert "model" in get_config("lazy/mask_rcnn_fpn_ohem.py")
    with pytest.raises(FileNotFoundError, match="not one of ohem_d2's configs"):
        get_config_file("nope.yaml")


def test_model_zoo_base_resolves_without_the_link(tmp_path):
    """A config whose _BASE_ is "model_zoo/..." loads where no configs/model_zoo link is
    (an installed wheel): the base comes from the installed Detectron2."""
    from detectron2.config import get_cfg

    import ohem_d2
    from ohem_d2.model_zoo import merge_config_file

    with open(os.path.join(REPO, "configs", "faster_rcnn_R_50_FPN_ohem.yaml")) as f:
        text = f.read()
    copy = tmp_path / "faster_rcnn_R_50_FPN_ohem.yaml"
    copy.write_text(text)
    cfg = ohem_d2.add_ohem_config(get_cfg())
    merge_config_file(cfg, str(copy))
    assert cfg.MODEL.ROI_HEADS.NAME == "OHEMROIHeads"  # this file
    assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 512  # this file
    assert cfg.MODEL.RPN.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]  # the zoo's base
    assert cfg.SOLVER.MAX_ITER == 90000  # the zoo's 1x schedule


def test_config_kind_mismatch_says_which_loader(tmp_path):
    from detectron2.config import get_cfg

    import ohem_d2
    from ohem_d2.model_zoo import ConfigKindError, merge_config_file

    config = os.path.join(REPO, "configs", "lazy", "mask_rcnn_fpn_ohem.py")
    with pytest.raises(ConfigKindError, match="LazyConfig"):
        merge_config_file(ohem_d2.add_ohem_config(get_cfg()), config)
    # A YAML config given where a LazyConfig is expected: train_net.py takes either, so the
    # only wrong kind left there is neither.
    other = tmp_path / "model.json"
    other.write_text("{}")
    result = run_train_net(["--config-file", str(other)], str(tmp_path))
    assert result.returncode != 0
    assert "give a YAML config (.yaml" in result.stdout and "LazyConfig (.py)" in result.stdout


def test_wheel_holds_the_configs_and_the_licence(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile

    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(
        os.path.join(REPO, "ohem_d2"), src / "ohem_d2", symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(src)],
        check=True,
    )  # fmt: skip
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(os.path.join(tmp_path, wheel)).namelist()
    assert "ohem_d2/configs/bccd/ohem.yaml" in names
    assert "ohem_d2/configs/lazy/mask_rcnn_fpn_ohem.py" in names
    assert "ohem_d2/configs/Base-FastRCNN-VGG16.yaml" in names
    # Not Detectron2's own configs (the set-up's link configs/model_zoo).
    assert not [n for n in names if "model_zoo/" in n]
    licences = {os.path.basename(n) for n in names if ".dist-info/licenses/" in n}
    assert {"LICENSE", "NOTICE"} <= licences, names
    assert not [n for n in names if n.startswith("datasets/")]

    # Installed (not editable) and run from elsewhere: the configs load from the package,
    # and the demo says what it needs instead of failing on a missing path.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         os.path.join(tmp_path, wheel)],
        check=True,
    )  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(target), DETECTRON2_DATASETS=str(tmp_path / "none"))
    run = dict(cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    code = "from ohem_d2.model_zoo import get_config; print(get_config('bccd/ohem.yaml').MODEL.ROI_HEADS.NAME)"  # noqa: E501
    loaded = subprocess.run([sys.executable, "-c", code], **run)
    assert loaded.stdout.strip().endswith("OHEMROIHeads"), loaded.stderr[-2000:]
    assert (
        str(target)
        in subprocess.run(
            [sys.executable, "-c", "import ohem_d2; print(ohem_d2.__file__)"], **run
        ).stdout
    )
    demo = subprocess.run([sys.executable, "-m", "ohem_d2.demo", "--iters", "1"], **run)
    assert demo.returncode != 0
    assert "BCCD not found" in demo.stderr and "--dataset toy" in demo.stderr, demo.stderr[-2000:]


def test_yaml_config_given_as_lazyconfig_names_what_is_missing():
    from ohem_d2.engine.lazy import load_lazy_config
    from ohem_d2.model_zoo import ConfigKindError

    with pytest.raises(ConfigKindError, match="lacks model, dataloader, optimizer"):
        load_lazy_config(os.path.join(REPO, "configs", "bccd", "ohem.yaml"))


@pytest.fixture(scope="module")
def coco80_checkpoint(tmp_path_factory):
    """A faster_rcnn_R_50_FPN_1x checkpoint of the 80-class COCO model (random weights)."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    path = str(tmp_path_factory.mktemp("coco80") / "model_coco80.pth")
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return path


PREDICTOR_KEYS = [
    f"roi_heads.box_predictor.{layer}.{p}"
    for layer in ("cls_score", "bbox_pred")
    for p in ("weight", "bias")
]


def test_fine_tuning_from_another_label_set(toy_coco, tmp_path, coco80_checkpoint):
    """Detectron2's commonest workflow: an 80-class checkpoint fine-tuned on 4 classes with
    the OHEM head. The predictor's tensors are skipped and logged, the rest loaded; --resume
    of a run stays strict."""
    zoo = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    head = ["MODEL.ROI_HEADS.NAME", "OHEMROIHeads", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False]
    stdout = _run_zoo(toy_coco, tmp_path, zoo, *head, "MODEL.WEIGHTS", coco80_checkpoint)
    for key in PREDICTOR_KEYS:
        assert f"Skip loading parameter '{key}'" in stdout, stdout[-4000:]
    assert "Skip loading parameter 'backbone" not in stdout
    assert set(_tasks(stdout)) == {"bbox"} and _mined_rois(tmp_path)
    # The run's own checkpoint, resumed with another number of classes: refused, by name.
    args = [*toy_coco["register"], "--resume", "--config-file", zoo, *SMALL, *head]
    args += ["DATASETS.TRAIN", "('toy_coco_train',)", "DATASETS.TEST", "('toy_coco_val',)"]
    args += ["OUTPUT_DIR", str(tmp_path), "MODEL.ROI_HEADS.NUM_CLASSES", 5, "SOLVER.MAX_ITER", 4]
    result = run_train_net(args, str(tmp_path))
    assert result.returncode != 0
    assert "CheckpointMismatchError" in result.stdout
    assert "'roi_heads.box_predictor.cls_score.weight' has shape (5, 1024)" in result.stdout


def test_lazy_config_fine_tuning_from_another_label_set(toy_coco, tmp_path, coco80_checkpoint):
    overrides = [
        f"train.device={DEVICE}",
        "train.max_iter=1",
        "train.eval_period=0",
        f"train.output_dir={tmp_path}",
        f"train.init_checkpoint={coco80_checkpoint}",
    ]
    result = _run_lazy_mask_rcnn(toy_coco, tmp_path, overrides)
    assert result.returncode == 0, result.stdout[-4000:]
    for key in PREDICTOR_KEYS:
        assert f"Skip loading parameter '{key}'" in result.stdout, result.stdout[-4000:]
    # The 80-class checkpoint has no mask head: its weights are listed as not found.
    assert "roi_heads.mask_head" in result.stdout
