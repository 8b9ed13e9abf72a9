"""The toy world's renderer: draws the image a scene (or prompt) describes.

One coloured shape on a light grey background, ``IMAGE_SIZE`` pixels square.
The four attributes map to pixels as follows:

- colour: the shape's fill, ``COLOUR_RGB[colour]`` (plus a small jitter);
- shape: circle, axis-aligned square, or triangle pointing up;
- size: the shape's extent (its bounding-box height) is ``SIZE_EXTENT[size]``
  of the canvas, 0.25 for small and 0.42 for large. With the +-10% size jitter
  the two ranges (0.225-0.275 vs 0.378-0.462) never meet, so small vs large is
  never ambiguous;
- position: the shape's centre lies off the canvas centre towards the left,
  right, top or bottom, at least ``MIDLINE_MARGIN`` of the canvas away along
  that axis and at most ``CROSS_AXIS_JITTER`` of it along the other, so the
  four positions never overlap.

``variation`` scales every random choice: 0 gives the canonical render (centre
of its half, nominal size, exact colour, flat background), 1 the default
jitter. The shape always stays at least one pixel inside the canvas, so a
clean render is never cut at the border.

Shapes are drawn at ``SUPERSAMPLING`` times the resolution and box-filtered
down, which gives anti-aliased edges and a per-pixel coverage in [0, 1] that
the colour compositing uses.

Styles (``style=``): the plain render (``None``, what every existing caller
draws, unchanged) or one of ``STYLES``, the target styles of Diffusion-RPO's
style-alignment evaluation, which the toy base models never saw. A style
changes how the shape is painted, never what the oracle judges: the shape's
outline (so shape, size and position) and its hue stay those of the plain
render of the same scene and jitter.

- ``outlined``: a thick band of the colour along the shape's edge around a
  light tint of the same colour;
- ``striped``: diagonal stripes of the colour and a darker shade of it.

A styled render draws the same random numbers as the plain one first and its
own (the stripe phase) last, so ``render(scene, rng_a, style="striped")`` and
``render(scene, rng_b)`` with two generators in the same state show the same
scene with the same jitter, one styled and one plain.

Tensors use the diffusion convention: ``[N, 3, H, W]`` float in [-1, 1].
``corrupt`` blurs and adds noise to such tensors, so the oracle can be trained
to read the blurry, noisy images a small generative model produces.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from alignment.toyworld.world import Scene

__all__ = [
    "BACKGROUND_RGB",
    "COLOUR_RGB",
    "IMAGE_SIZE",
    "SIZE_EXTENT",
    "STYLES",
    "check_style",
    "corrupt",
    "from_tensor",
    "render",
    "render_batch",
    "to_tensor",
]

IMAGE_SIZE = 32

# Far apart in RGB (closest pair: cyan and blue, ~115 of 255) and each far from the
# background, so colour is unambiguous even after blur and noise. Yellow is the
# closest to the grey background (distance ~0.7 in [0, 1] units) and still clearly visible.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 190),
    "cyan": (30, 190, 200),
}
BACKGROUND_RGB: tuple[int, int, int] = (210, 210, 210)

# Shape extent (bounding-box height) as a fraction of the canvas.
SIZE_EXTENT: dict[str, float] = {"small": 0.25, "large": 0.42}

# Jitter amplitudes at variation=1.
SIZE_JITTER = 0.10  # relative, uniform in +-10%
AXIS_JITTER = 0.17  # of the canvas, uniform around the centre of the half, along the position's axis
CROSS_AXIS_JITTER = 0.04  # of the canvas, uniform around the midline, across it
COLOUR_JITTER = 12.0  # per channel, uniform in +-12 (0-255 scale)
BACKGROUND_NOISE_STD = 3.0  # per pixel and channel (0-255 scale)

# The shape keeps this many pixels clear of the canvas border, and its centre
# keeps this fraction of the canvas clear of the midline across its position's
# axis (twice the cross-axis jitter), so "left" and "top" stay distinct even for a large shape.
BORDER_MARGIN_PX = 1.0
MIDLINE_MARGIN = 0.08

SUPERSAMPLING = 4

# Width of a triangle and side of a square relative to the extent: chosen so
# the three shapes have similar areas at the same size.
TRIANGLE_WIDTH = 1.15
SQUARE_SIDE = 0.9
_WIDTH_PER_EXTENT: dict[str, float] = {"circle": 1.0, "square": SQUARE_SIDE, "triangle": TRIANGLE_WIDTH}

# Styles. Measured with the oracle (which must still read all four attributes on a
# styled render; see alignment/toyworld/style.py and data/toyworld/README.md).
OUTLINED = "outlined"
STRIPED = "striped"
STYLES: tuple[str, ...] = (OUTLINED, STRIPED)
# Outline band: this fraction of the shape's extent, at least OUTLINE_MIN_PX, measured inwards from the edge.
OUTLINE_FRACTION = 0.25
OUTLINE_MIN_PX = 1.5
# Interior of an outlined shape: the colour mixed this far towards white (a tint, not another hue).
OUTLINE_INTERIOR_TINT = 0.45
# Stripes: period in pixels (along the image diagonal), and how much darker the second stripe is.
STRIPE_PERIOD_PX = 4.0
STRIPE_SHADE = 0.3


def _shape_centre_and_extent(
    scene: Scene, rng: np.random.Generator | None, size: int, variation: float
) -> tuple[float, float, float]:
    """Centre (x, y) and extent, in pixels, of the shape a scene draws."""
    jitter = variation if rng is not None else 0.0
    extent = SIZE_EXTENT[scene.size] * size
    if jitter:
        extent *= 1.0 + jitter * SIZE_JITTER * rng.uniform(-1.0, 1.0)
    half_width = extent * _WIDTH_PER_EXTENT[scene.shape] / 2.0
    horizontal = scene.position in ("left", "right")
    # Half the shape's size along the position's axis: its width for left/right, its height for top/bottom.
    half_along = half_width if horizontal else extent / 2.0

    half = size / 2.0
    along = size / 4.0  # distance from the near border, along the position's axis
    across = 0.0  # offset from the midline, across it
    if jitter:
        along += jitter * AXIS_JITTER * size * rng.uniform(-1.0, 1.0)
        across = jitter * CROSS_AXIS_JITTER * size * rng.uniform(-1.0, 1.0)
    # Keep the whole shape inside the canvas and its centre off the midline.
    along = float(np.clip(along, half_along + BORDER_MARGIN_PX, half - MIDLINE_MARGIN * size))
    if scene.position in ("right", "bottom"):
        along = size - along
    if horizontal:
        return along, half + across, extent
    return half + across, along, extent


@functools.lru_cache(maxsize=8)
def _subpixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the ``SUPERSAMPLING``-times finer grid, in pixel coordinates (x, y)."""
    centres = (np.arange(size * SUPERSAMPLING, dtype=np.float32) + 0.5) / SUPERSAMPLING
    return centres[None, :], centres[:, None]


def _coverage(shape: str, centre_x: float, centre_y: float, extent: float, size: int) -> np.ndarray:
    """Per-pixel fraction [size, size] of the canvas the shape covers.

    Inside-tests on a supersampled grid, averaged per pixel: exact geometry,
    with none of the inclusive-endpoint rounding of raster drawing calls.
    """
    x, y = _subpixel_grid(size)
    dx, dy = x - centre_x, y - centre_y
    if shape == "circle":
        inside = dx**2 + dy**2 <= (extent / 2.0) ** 2
    elif shape == "square":
        half_side = extent * SQUARE_SIDE / 2.0
        inside = (np.abs(dx) <= half_side) & (np.abs(dy) <= half_side)
    elif shape == "triangle":
        # Apex at the top centre; the half-width grows linearly down to the base.
        depth = dy + extent / 2.0
        inside = (depth >= 0.0) & (dy <= extent / 2.0) & (np.abs(dx) <= TRIANGLE_WIDTH / 2.0 * depth)
    else:  # Scene validates its shape, so only a new SHAPES entry can get here.
        raise ValueError(f"the renderer cannot draw shape {shape!r}")
    return inside.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean(axis=(1, 3), dtype=np.float32)


def _depth(shape: str, centre_x: float, centre_y: float, extent: float, size: int) -> np.ndarray:
    """Distance in pixels from each subpixel to the shape's edge, positive inside, on the supersampled grid.

    The zero level set is the edge ``_coverage`` tests against, so ``depth >= 0``
    is the same shape; the styles use the depth to draw bands along the edge.
    For the square and the triangle it is the distance to the nearest side's line.
    """
    x, y = _subpixel_grid(size)
    dx, dy = x - centre_x, y - centre_y
    if shape == "circle":
        return extent / 2.0 - np.sqrt(dx**2 + dy**2)
    if shape == "square":
        return extent * SQUARE_SIDE / 2.0 - np.maximum(np.abs(dx), np.abs(dy))
    if shape == "triangle":
        slope = TRIANGLE_WIDTH / 2.0
        sides = (slope * (dy + extent / 2.0) - np.abs(dx)) / math.sqrt(1.0 + slope**2)
        return np.minimum(extent / 2.0 - dy, sides)
    raise ValueError(f"the renderer cannot draw shape {shape!r}")


def _pixel_mean(subpixels: np.ndarray, size: int) -> np.ndarray:
    """Box-filters a supersampled [size * S, size * S] mask down to per-pixel fractions [size, size]."""
    return subpixels.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean(axis=(1, 3), dtype=np.float32)


def _styled_layers(
    style: str,
    scene: Scene,
    centre_x: float,
    centre_y: float,
    extent: float,
    size: int,
    colour: np.ndarray,
    rng: np.random.Generator | None,
    jitter: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two paints of a styled shape: per-pixel coverage of each ``[size, size, 1]`` and the second colour."""
    depth = _depth(scene.shape, centre_x, centre_y, extent, size)
    inside = depth >= 0.0
    if style == OUTLINED:
        band = max(OUTLINE_MIN_PX, OUTLINE_FRACTION * extent)
        second = inside & (depth >= band)
        second_colour = colour + OUTLINE_INTERIOR_TINT * (255.0 - colour)
    elif style == STRIPED:
        # Drawn last so the plain render's random numbers come first (see the module docstring).
        phase = rng.uniform(0.0, 1.0) if jitter else 0.0
        x, y = _subpixel_grid(size)
        second = inside & (((x + y) / STRIPE_PERIOD_PX + phase) % 1.0 >= 0.5)
        second_colour = colour * (1.0 - STRIPE_SHADE)
    else:
        raise ValueError(f"unknown style {style!r}; the renderer draws {', '.join(STYLES)} (or None for plain)")
    first = inside & ~second
    return _pixel_mean(first, size)[..., None], _pixel_mean(second, size)[..., None], second_colour


def check_style(style: str | None) -> str | None:
    """``style`` if the renderer can draw it (None is the plain render); ValueError naming the styles otherwise."""
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown style {style!r}; the renderer draws {', '.join(STYLES)} (or None for plain)")
    return style


def render(
    scene: Scene,
    rng: np.random.Generator | None = None,
    *,
    size: int = IMAGE_SIZE,
    variation: float = 1.0,
    style: str | None = None,
) -> Image.Image:
    """Draws one scene.

    Args:
        scene: What to draw.
        rng: Source of the jitter; None gives the canonical, deterministic render.
        size: Width and height in pixels.
        variation: Scales all jitter; 0 is canonical, 1 the default amount.
        style: None for the plain render, or one of ``STYLES``.

    Returns:
        An RGB image of ``size`` x ``size`` pixels.
    """
    if variation < 0:
        raise ValueError(f"variation must be >= 0, got {variation}")
    check_style(style)
    jitter = variation if rng is not None else 0.0
    centre_x, centre_y, extent = _shape_centre_and_extent(scene, rng, size, variation)
    coverage = _coverage(scene.shape, centre_x, centre_y, extent, size)[..., None]

    colour = np.asarray(COLOUR_RGB[scene.colour], dtype=np.float32)
    background = np.broadcast_to(np.asarray(BACKGROUND_RGB, dtype=np.float32), (size, size, 3))
    if jitter:
        colour = colour + jitter * COLOUR_JITTER * rng.uniform(-1.0, 1.0, size=3)
        background = background + jitter * BACKGROUND_NOISE_STD * rng.standard_normal((size, size, 3))
    if style is None:
        pixels = coverage * colour + (1.0 - coverage) * background
    else:
        first, second, second_colour = _styled_layers(
            style, scene, centre_x, centre_y, extent, size, colour, rng, jitter
        )
        pixels = first * colour + second * second_colour + (1.0 - first - second) * background
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (all the same size) as a ``[N, 3, H, W]`` float tensor in [-1, 1]."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0


def from_tensor(images: torch.Tensor) -> list[Image.Image]:
    """Inverse of ``to_tensor``: ``[N, 3, H, W]`` in [-1, 1] to RGB images (values clamped)."""
    pixels = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(array, mode="RGB") for array in pixels.permute(0, 2, 3, 1).numpy()]


def render_batch(
    scenes: Sequence[Scene],
    rng: np.random.Generator | None,
    *,
    size: int = IMAGE_SIZE,
    variation: float = 1.0,
    style: str | None = None,
) -> torch.Tensor:
    """Renders scenes in order as a ``[N, 3, size, size]`` float tensor in [-1, 1], all in one ``style``."""
    check_style(style)
    return to_tensor([render(scene, rng, size=size, variation=variation, style=style) for scene in scenes])


def _gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """One normalised 1-D gaussian per sigma, ``[N, 2 * radius + 1]``; sigma 0 is the identity."""
    offsets = torch.arange(-radius, radius + 1, dtype=sigmas.dtype)
    # A tiny floor turns sigma 0 into a delta instead of a division by zero.
    kernels = torch.exp(-(offsets[None, :] ** 2) / (2.0 * sigmas[:, None].clamp_min(1e-3) ** 2))
    return kernels / kernels.sum(dim=1, keepdim=True)


def corrupt(
    images: torch.Tensor, rng: torch.Generator, *, blur: float, noise: float, return_strengths: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blurs and noises images the way a small generative model's samples are degraded.

    Each image draws its own blur sigma uniformly in [0, blur] pixels and its
    own noise std uniformly in [0, noise] (in [-1, 1] units), so a batch spans
    clean to heavily degraded. The border is reflected before blurring so the
    background does not darken towards the edges.

    Args:
        images: ``[N, 3, H, W]`` in [-1, 1].
        rng: Torch generator for the per-image strengths and the noise (CPU).
        blur: Largest gaussian blur sigma, in pixels.
        noise: Largest gaussian pixel-noise std.
        return_strengths: Also return each image's blur sigma and noise std ``[N]``
            (zeros where the corresponding maximum is 0).

    Returns:
        The corrupted images, same shape and dtype, clamped to [-1, 1]
        (and the strengths, if asked).
    """
    if blur < 0 or noise < 0:
        raise ValueError(f"blur and noise must be >= 0, got blur={blur}, noise={noise}")
    count, channels, height, width = images.shape
    work = images.detach().float().cpu()
    sigmas = stds = torch.zeros(count)
    if blur > 0:
        sigmas = torch.rand(count, generator=rng) * blur
        # Reflect padding needs the radius below the image side.
        radius = min(max(1, math.ceil(3.0 * blur)), min(height, width) - 1)
        kernels = _gaussian_kernels(sigmas, radius).repeat_interleave(channels, dim=0)  # [N*C, K]
        # Grouped convolution: every (image, channel) plane gets its own image's kernel.
        planes = work.reshape(1, count * channels, height, width)
        planes = F.pad(planes, (radius, radius, 0, 0), mode="reflect")
        planes = F.conv2d(planes, kernels[:, None, None, :], groups=count * channels)
        planes = F.pad(planes, (0, 0, radius, radius), mode="reflect")
        planes = F.conv2d(planes, kernels[:, None, :, None], groups=count * channels)
        work = planes.reshape(count, channels, height, width)
    if noise > 0:
        stds = torch.rand(count, generator=rng) * noise
        work = work + stds[:, None, None, None] * torch.randn(work.shape, generator=rng)
    corrupted = work.clamp(-1.0, 1.0).to(device=images.device, dtype=images.dtype)
    return (corrupted, sigmas, stds) if return_strengths else corrupted
