"""RoI pooling of one image's many RoIs split across CPU threads, for the readonly pass.

torchvision's CPU ``roi_pool`` and ``roi_align`` kernels run on one thread, so pooling the
thousands of RoIs that OHEM scores took a quarter of VGG16's readonly pass on a 2-core CPU
(profile in benchmarks/README.md) while the other core idled. The kernels release the GIL, so
running the pooler on parts of the RoIs in a thread pool uses every core; each output row
depends only on its own RoI, so the result is identical to one call. Pooling stays Detectron2's
``ROIPooler`` (any pooler type, any number of levels); on CUDA it is a single call.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from detectron2.layers import cat
from detectron2.structures import Boxes
from torch import nn

__all__ = ["pool_rois"]

MIN_ROIS_PER_THREAD = 128  # below this, one call is cheaper than handing work to threads

_executors: dict[int, ThreadPoolExecutor] = {}  # by number of threads
_executors_lock = threading.Lock()


def _thread_pool(num_threads: int) -> ThreadPoolExecutor:
    with _executors_lock:
        if num_threads not in _executors:
            _executors[num_threads] = ThreadPoolExecutor(num_threads, thread_name_prefix="ohem")
        return _executors[num_threads]


def pool_rois(
    pooler: nn.Module,
    features: list[torch.Tensor],
    boxes: Boxes,
    num_threads: int | None = None,
) -> torch.Tensor:
    """``pooler(features, [boxes])`` for one image, with the RoIs split across CPU threads.

    Args:
        pooler: a Detectron2 ``ROIPooler`` (or any module with its call signature).
        features: the image's feature maps, each (1, C, H, W).
        boxes: the image's R RoIs.
        num_threads: threads to use; default ``torch.get_num_threads()``.

    Returns:
        (R, C, output_size, output_size), equal to ``pooler(features, [boxes])``.
    """
    num_threads = num_threads or torch.get_num_threads()
    parts = min(num_threads, len(boxes) // MIN_ROIS_PER_THREAD)
    if parts < 2 or features[0].device.type != "cpu":
        return pooler(features, [boxes])
    # Grad mode is thread-local: the workers run in the caller's.
    grad_enabled = torch.is_grad_enabled()

    def pool(part: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(grad_enabled):
            return pooler(features, [Boxes(part)])

    splits = boxes.tensor.tensor_split(parts)
    return cat(list(_thread_pool(num_threads).map(pool, splits)), dim=0)
