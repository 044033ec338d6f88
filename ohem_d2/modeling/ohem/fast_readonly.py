"""A faster, approximate readonly pass (beyond the paper): low-rank fully-connected layers.

The readonly pass is dominated by the box head's large fully-connected layers (VGG16's fc6 is
25088 x 4096). Each such layer W (out x in) runs instead as two thin layers, W ~ P P^T W, with
P (out x r) the top-r principal directions of the layer's outputs x W^T, estimated on an exact
readonly pass every ``refresh_period`` passes (a data-driven truncated factorisation, as in
Zhang et al., "Accelerating very deep convolutional networks", TPAMI 2016; Fast R-CNN used the
truncated SVD of W itself at test time). Principal directions of the outputs, unlike those of
W, stay accurate for a randomly initialised W, whose singular values are all alike.

The substitution is done by a :class:`TorchFunctionMode` that recognises the layers' weight
tensors in ``F.linear``: the modules themselves are never modified, and it applies to any box
head made of ``nn.Linear`` layers.
"""

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .distributed import sum_over_processes
from .settings import FAST_READONLY_MODES, check_settings

__all__ = ["FAST_READONLY_MODES", "LowRankReadonly", "build_readonly_approximation"]


class _LowRankLinear:
    """The factors of one fully-connected layer and the statistics that refresh them."""

    def __init__(self, weight: torch.Tensor, rank: int):
        self.weight = weight
        self.rank = rank
        self.passes_since_refresh = 0  # passes since the last exact one, that one included
        self.down = self.up = None  # (r, in) and (out, r): y ~ (x down^T) up^T + b
        self.second_moment = None  # (out, out) sum of y y^T over a calibration pass

    def calibrate(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The exact layer, recording the second moment of its (bias-free) outputs."""
        y = F.linear(x, self.weight)
        y2 = y.reshape(-1, y.shape[-1]).float()
        moment = y2.T @ y2
        self.second_moment = moment if self.second_moment is None else self.second_moment + moment
        return y if bias is None else y + bias

    def approximate(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, bias)

    def refresh(self) -> None:
        """Factors from the principal directions of the calibration pass's outputs, those of
        every process (so that every process keeps the same factors)."""
        if self.second_moment is None:  # the layer did not run here (e.g. no RoI at all)
            out = self.weight.shape[0]
            self.second_moment = self.weight.new_zeros((out, out), dtype=torch.float32)
        sum_over_processes(self.second_moment)
        if not bool(self.second_moment.any()):  # it ran nowhere
            self.second_moment = None
            return
        start = None if self.up is None else self.up.to(self.second_moment.dtype)
        basis = _top_eigenvectors(self.second_moment, self.rank, start).to(self.weight.dtype)
        self.up = basis.contiguous()
        self.down = (basis.T @ self.weight.detach()).contiguous()
        self.second_moment = None


def _top_eigenvectors(
    matrix: torch.Tensor, rank: int, start: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, rank) orthonormal top eigenvectors of a symmetric PSD (n, n) matrix, by subspace
    iteration with Rayleigh-Ritz: a few (n, n) x (n, rank) products instead of a full
    eigendecomposition, which takes minutes for n = 4096 on a small CPU.

    ``start``: (n, rank) previous eigenvectors to warm-start from (fewer iterations).
    """
    n = matrix.shape[0]
    width = min(n, rank + 16)  # oversampling makes the last of the ``rank`` vectors accurate
    # A private generator: the global RNG (dropout masks) must not see the refresh.
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    q = torch.randn(n, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    if start is not None:
        q[:, :rank] = start
    for _ in range(2 if start is not None else 4):
        q = torch.linalg.qr(matrix @ q).Q
    _, vectors = torch.linalg.eigh(q.T @ matrix @ q)  # ascending eigenvalues
    return (q @ vectors[:, -rank:]).flip(1)


class _LinearOverride(TorchFunctionMode):
    """Routes ``F.linear`` calls on the given weight tensors to ``handlers[id(weight)]``."""

    def __init__(self, handlers: dict[int, tuple[torch.Tensor, object]]):
        super().__init__()
        self.handlers = handlers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            bound = dict(zip(("input", "weight", "bias"), args)) | kwargs
            entry = self.handlers.get(id(bound["weight"]))
            if entry is not None and entry[0] is bound["weight"]:
                return entry[1](bound["input"], bound.get("bias"))
        return func(*args, **kwargs)


class LowRankReadonly:
    """Low-rank stand-ins for the large fully-connected layers of the readonly pass.

    Use as ``ReadonlyScorer(approximation=LowRankReadonly(rank=..., refresh_period=...))``.
    The first pass over a layer, and every ``refresh_period``-th pass after, is exact and
    refreshes its factors afterwards; the other passes use the factors. Only layers whose
    factorised cost ``rank * (in + out)`` is below ``in * out`` are replaced, and of those only
    the first ``num_layers`` in module order (0: all).

    Why only the first by default: a layer fed by a dropout layer (VGG's fc7) sees the dropout
    noise in every direction of its input, and a low-rank stand-in loses that noise; on
    VGG16 it cost 10-15 points of hard-set overlap, while fc6 on the pooled features (which
    holds 85 % of the box head's multiply-adds) cost 2-3 (benchmarks/README.md).

    Attributes:
        last_refresh_s: wall time of the latest refresh (eigendecomposition and factors), s.
    """

    def __init__(self, *, rank: int, refresh_period: int, num_layers: int = 1):
        check_settings(rank=rank, refresh_period=refresh_period, num_layers=num_layers)
        self.rank = rank
        self.refresh_period = refresh_period
        self.num_layers = num_layers
        self.layers: dict[int, _LowRankLinear] = {}
        self.last_refresh_s = 0.0

    def _cheaper(self, linear: nn.Linear) -> bool:
        out_dim, in_dim = linear.weight.shape
        return self.rank * (in_dim + out_dim) < in_dim * out_dim

    def _layer(self, linear: nn.Linear) -> _LowRankLinear:
        weight = linear.weight
        layer = self.layers.get(id(weight))
        if layer is None or layer.weight is not weight:
            layer = self.layers[id(weight)] = _LowRankLinear(weight, self.rank)
        return layer

    @contextlib.contextmanager
    def __call__(self, modules: Sequence[nn.Module]) -> Iterator[None]:
        """Context of one readonly pass over ``modules``."""
        linears = [
            m
            for module in modules
            for m in module.modules()
            if isinstance(m, nn.Linear) and self._cheaper(m)
        ]
        layers = [self._layer(m) for m in linears[: self.num_layers or None]]
        calibrating = [
            layer
            for layer in layers
            if layer.up is None or layer.passes_since_refresh >= self.refresh_period
        ]
        handlers = {
            id(layer.weight): (
                layer.weight,
                layer.calibrate if layer in calibrating else layer.approximate,
            )
            for layer in layers
        }
        for layer in calibrating:
            layer.second_moment = None
            layer.passes_since_refresh = 0
        with _LinearOverride(handlers):
            yield
        for layer in layers:
            layer.passes_since_refresh += 1
        if calibrating:
            start = time.perf_counter()
            for layer in calibrating:
                layer.refresh()
            self.last_refresh_s = time.perf_counter() - start


def build_readonly_approximation(mode: str, *, rank: int, refresh_period: int, num_layers: int = 1):
    """The approximation of MODEL.ROI_HEADS.OHEM.FAST_READONLY, or None for the exact pass."""
    check_settings(fast_readonly_mode=mode)
    if mode == "lowrank":
        return LowRankReadonly(rank=rank, refresh_period=refresh_period, num_layers=num_layers)
    return None
