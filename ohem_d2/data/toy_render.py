"""Drawing the images of the toy dataset: one image and its objects from (seed, index).

The same (spec, index) always gives the same pixels and boxes, whichever process draws it
and in whatever order (each image has its own random generator).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .toy import TOY_CLASS_NAMES, ToyDatasetSpec

__all__ = ["render_image"]


@dataclass
class _Layer:
    """A soft mask (alpha in [0, 1]) over the window [y0:y1, x0:x1] of the image."""

    y0: int
    x0: int
    alpha: np.ndarray

    @property
    def window(self):
        h, w = self.alpha.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)


_SUPERSAMPLE = 2


def _polygon_layer(points, width, height, outline_width=0) -> _Layer | None:
    """Rasterise a polygon (N, 2) with 2x supersampling; None if it misses the image."""
    x0 = max(int(np.floor(points[:, 0].min())) - 2, 0)
    y0 = max(int(np.floor(points[:, 1].min())) - 2, 0)
    x1 = min(int(np.ceil(points[:, 0].max())) + 2, width)
    y1 = min(int(np.ceil(points[:, 1].max())) + 2, height)
    if x1 <= x0 or y1 <= y0:
        return None
    s = _SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    local = [((x - x0) * s, (y - y0) * s) for x, y in points]
    draw = ImageDraw.Draw(mask)
    if outline_width:
        draw.line(local + local[:1], fill=255, width=int(outline_width * s), joint="curve")
    else:
        draw.polygon(local, fill=255)
    alpha = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.BOX), dtype=np.float32) / 255.0
    if not alpha.any():
        return None
    return _Layer(y0, x0, alpha)


def _shape_polygon(rng, kind, cx, cy, size):
    """Vertices (N, 2) of a shape whose circumscribed diameter is about ``size``."""
    r = size / 2.0
    angle = rng.uniform(0, 2 * np.pi)
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        aspect = rng.uniform(0.9, 1.1)
        pts = np.stack([r * aspect * np.cos(t), r * np.sin(t)], axis=1)
    elif kind == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif kind == "triangle":
        t = np.arange(3) * 2 * np.pi / 3
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif kind == "star":
        t = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        pts = np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)
    else:
        raise ValueError(kind)
    if kind != "circle":
        pts = pts * rng.uniform(0.96, 1.04, size=(len(pts), 1))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T + np.array([cx, cy])


def _blob_polygon(rng, cx, cy, size):
    n = int(rng.integers(7, 13))
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = size / 2.0 * rng.uniform(0.5, 1.0, n)
    return np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=1)


def _ellipse_polygon(rng, cx, cy, size):
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    a, b = size / 2.0, size / 2.0 / rng.uniform(1.8, 3.5)
    angle = rng.uniform(0, np.pi)
    pts = np.stack([a * np.cos(t), b * np.sin(t)], axis=1)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T + np.array([cx, cy])


def _half_plane_cut(layer: _Layer, rng, cx, cy, size) -> _Layer:
    """Keep the part of a shape beyond a random line off its centre (under half of it)."""
    theta = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(0.1, 0.3) * size
    h, w = layer.alpha.shape
    ys, xs = np.mgrid[layer.y0 : layer.y0 + h, layer.x0 : layer.x0 + w]
    along = (xs + 0.5 - cx) * np.cos(theta) + (ys + 0.5 - cy) * np.sin(theta)
    layer.alpha = layer.alpha * np.clip(along - offset + 0.5, 0, 1).astype(np.float32)
    return layer


def _random_colour(rng):
    h, s, v = rng.uniform(0, 1), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _paint(image, layer: _Layer, rng, colour):
    """Composite a shaded, slightly noisy colour through the layer's mask."""
    ys, xs = layer.window
    h, w = layer.alpha.shape
    gx, gy = np.meshgrid(np.linspace(-1, 1, w), np.linspace(-1, 1, h))
    theta = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + rng.uniform(0.05, 0.2) * (gx * np.cos(theta) + gy * np.sin(theta))
    fill = colour[None, None, :] * shade[..., None] + rng.normal(0, 5, (h, w, 3))
    a = layer.alpha[..., None]
    image[ys, xs] = image[ys, xs] * (1 - a) + fill * a


def _upsampled_noise(rng, height, width, cell):
    small = rng.normal(0, 1, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
    channels = [
        np.asarray(Image.fromarray(small[..., c], mode="F").resize((width, height), Image.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=-1)


def _background(rng, height, width):
    base = rng.uniform(50, 205, 3).astype(np.float32)
    image = base + 28 * _upsampled_noise(rng, height, width, 24)
    image += 10 * _upsampled_noise(rng, height, width, 6)
    if rng.random() < 0.5:
        ys, xs = np.mgrid[0:height, 0:width]
        theta, period = rng.uniform(0, np.pi), rng.uniform(8, 24)
        wave = np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / period)
        image += (rng.uniform(6, 16) * wave)[..., None] * rng.uniform(0.5, 1.0, 3)
    return image


def _clutter_layer(rng, width, height, size_range):
    size = float(np.exp(rng.uniform(*np.log(size_range))))
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    kind = rng.choice(["blob", "ellipse", "fragment", "outline", "stroke"])
    if kind == "blob":
        return _polygon_layer(_blob_polygon(rng, cx, cy, size), width, height)
    if kind == "ellipse":
        return _polygon_layer(_ellipse_polygon(rng, cx, cy, size), width, height)
    shape = str(rng.choice(TOY_CLASS_NAMES))
    if kind == "fragment":
        layer = _polygon_layer(_shape_polygon(rng, shape, cx, cy, size), width, height)
        return None if layer is None else _half_plane_cut(layer, rng, cx, cy, size)
    if kind == "outline":
        pts = _shape_polygon(rng, shape, cx, cy, size)
        return _polygon_layer(pts, width, height, outline_width=rng.uniform(1.5, 3.0))
    n = int(rng.integers(2, 4))
    pts = np.array([cx, cy]) + np.cumsum(rng.normal(0, size / 2.5, (n, 2)), axis=0)
    return _stroke_layer(pts, width, height, rng.uniform(1.5, 4.0))


def _stroke_layer(points, width, height, line_width) -> _Layer | None:
    pad = line_width + 2
    x0, y0 = max(int(points[:, 0].min() - pad), 0), max(int(points[:, 1].min() - pad), 0)
    x1 = min(int(points[:, 0].max() + pad) + 1, width)
    y1 = min(int(points[:, 1].max() + pad) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    s = _SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    local = [((x - x0) * s, (y - y0) * s) for x, y in points]
    ImageDraw.Draw(mask).line(local, fill=255, width=int(line_width * s), joint="curve")
    alpha = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.BOX), dtype=np.float32) / 255.0
    return _Layer(y0, x0, alpha) if alpha.any() else None


def _polygon_area(points):
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


@dataclass
class _PlacedObject:
    name: str
    layer: _Layer
    full_area: float  # of the whole shape, including any part outside the image
    visible: np.ndarray  # alpha still visible after everything drawn later


def _occlude(placed: list[_PlacedObject], layer: _Layer, dry_run=False):
    """Visible area fraction of each placed object once ``layer`` is drawn over it."""
    fractions = []
    for obj in placed:
        visible = obj.visible
        oy, ox = obj.layer.y0, obj.layer.x0
        h, w = visible.shape
        ly, lx = layer.y0, layer.x0
        lh, lw = layer.alpha.shape
        y0, y1 = max(oy, ly), min(oy + h, ly + lh)
        x0, x1 = max(ox, lx), min(ox + w, lx + lw)
        if y1 > y0 and x1 > x0:
            cover = layer.alpha[y0 - ly : y1 - ly, x0 - lx : x1 - lx]
            if dry_run:
                visible = visible.copy()
            visible[y0 - oy : y1 - oy, x0 - ox : x1 - ox] *= 1 - cover
        fractions.append(float(visible.sum()) / obj.full_area)
    return fractions


# Hard cases, by image index: tiny objects, low contrast, crowds with heavy occlusion.
_HARD_CASES = {3: "small", 9: "low_contrast", 15: "crowded"}


def render_image(spec: ToyDatasetSpec, index: int):
    """Draw image ``index``. Returns (uint8 HxWx3 RGB image, list of object dicts, case)."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, index]))
    width = int(rng.integers(spec.min_side, spec.max_side + 1))
    height = int(rng.integers(spec.min_side, spec.max_side + 1))
    case = _HARD_CASES.get(index % 20, "normal")
    image = _background(rng, height, width)
    side = min(width, height)

    for _ in range(int(rng.integers(4, 10))):
        layer = _clutter_layer(rng, width, height, (14, 0.35 * side))
        if layer is not None:
            _paint(image, layer, rng, _random_colour(rng))

    num_objects, size_range, min_visible = int(rng.integers(2, 6)), (22, 0.4 * side), 0.5
    if case == "small":
        num_objects, size_range = int(rng.integers(3, 7)), (12, 22)
    elif case == "crowded":
        num_objects, min_visible = int(rng.integers(6, 10)), 0.3
    placed: list[_PlacedObject] = []
    for _ in range(num_objects):
        for _attempt in range(20):
            name = str(rng.choice(TOY_CLASS_NAMES))
            size = float(np.exp(rng.uniform(*np.log(size_range))))
            cx = rng.uniform(-0.15 * size, width + 0.15 * size)
            cy = rng.uniform(-0.15 * size, height + 0.15 * size)
            points = _shape_polygon(rng, name, cx, cy, size)
            layer = _polygon_layer(points, width, height)
            if layer is None:
                continue
            full_area = _polygon_area(points)
            if layer.alpha.sum() < 0.6 * full_area:  # too much of it outside the image
                continue
            if any(f < min_visible for f in _occlude(placed, layer, dry_run=True)):
                continue
            _occlude(placed, layer)
            placed.append(_PlacedObject(name, layer, full_area, layer.alpha.copy()))
            if case == "low_contrast":
                ys, xs = layer.window
                colour = image[ys, xs].reshape(-1, 3).mean(0) + rng.normal(0, 30, 3)
            else:
                colour = _random_colour(rng)
            _paint(image, layer, rng, colour.astype(np.float32))
            break

    # A few thin strokes over everything, crossing objects as twigs or wires would.
    for _ in range(int(rng.integers(0, 3))):
        pts = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        pts = pts + np.cumsum(rng.normal(0, side / 6, (2, 2)), axis=0)
        layer = _stroke_layer(pts, width, height, rng.uniform(1.0, 2.5))
        if layer is not None:
            _occlude(placed, layer)
            _paint(image, layer, rng, _random_colour(rng))

    image += rng.normal(0, 3, image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    objects = []
    for obj in placed:
        ys, xs = np.nonzero(obj.visible > 0.5)
        if len(ys) == 0:
            continue
        x1, y1 = obj.layer.x0 + int(xs.min()), obj.layer.y0 + int(ys.min())
        x2, y2 = obj.layer.x0 + int(xs.max()) + 1, obj.layer.y0 + int(ys.max()) + 1
        visible_fraction = float(obj.visible.sum()) / obj.full_area
        in_image_fraction = float(obj.layer.alpha.sum()) / obj.full_area
        objects.append(
            {
                "name": obj.name,
                "bbox": (x1, y1, x2, y2),  # XYXY_ABS, pixels [x1, x2) x [y1, y2)
                "truncated": int(in_image_fraction < 0.97),
                "difficult": int(visible_fraction < 0.4 or min(x2 - x1, y2 - y1) < 10),
            }
        )
    return image, objects, case
