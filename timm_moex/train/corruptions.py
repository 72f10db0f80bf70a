"""Common image corruptions at five severities, with the CIFAR-10-C parameters.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019, define 15 benchmark corruptions (noise, blur, weather, digital) and 4
extra ones, each at severities 1-5; the code they released to build CIFAR-10-C
(``ImageNet-C/create_c/make_cifar_c.py`` of github.com/hendrycks/robustness, "the released code"
below) fixes the parameters of every severity for 32x32 images. The functions here take those
parameters and compute each corruption with numpy, Pillow and scipy:

- noise: ``gaussian_noise``, ``shot_noise``, ``impulse_noise`` (and the extra ``speckle_noise``);
- blur: ``defocus_blur``, ``glass_blur``, ``motion_blur``, ``zoom_blur`` (and the extra
  ``gaussian_blur``);
- weather: ``snow``, ``fog``, ``brightness``;
- digital: ``contrast``, ``elastic_transform``, ``pixelate``, ``jpeg_compression`` (and the extra
  ``saturate``).

Left out (:data:`LEFT_OUT`):

- ``frost`` (benchmark) blends in crops of six frost photographs that come with the original
  code; they are image files this package does not ship.
- ``spatter`` (extra) is built from OpenCV operations (Canny edges, a distance transform,
  histogram equalization), and OpenCV is not a dependency.

So ``all`` (:data:`BENCHMARK_AVAILABLE`) is 14 of the 15 benchmark corruptions.

Where the computation differs from the released code:

- ``motion_blur`` and ``snow``: the original calls ImageMagick's motion blur through Wand. Here it is
  a numpy version of ImageMagick's MotionBlurImage algorithm: a one-sided Gaussian of
  ``2 * ceil(radius) + 1`` taps, tap ``i`` at the pixel offset ``ceil(i * (cos a, sin a) - 0.5)``
  along the angle ``a``, edge pixels repeated outside the image, the result rounded to 8 bits. It
  was not compared with ImageMagick's output (ImageMagick is not installed where it was written);
  ImageMagick computes in 16-bit or floating-point quanta, so single pixels may differ by a level.
- ``glass_blur``: the released loop means to swap each pixel with a random neighbour, but its
  ``a, b = b, a`` on numpy rows copies the neighbour instead (the right-hand side holds views), and
  its offsets ``randint(-1, 1)`` are -1 or 0. Since the loop runs from the bottom-right corner, every
  pixel it reads is still unchanged, so the pass is one gather: each pixel of the loop's range takes
  the value of itself or of its upper, left or upper-left neighbour. That is what is done here, the
  published CIFAR-10-C images being made that way.
- ``impulse_noise``: each value (pixel and channel) is hit with probability ``amount`` and set to 0
  or 1 with equal odds, as scikit-image's ``random_noise(mode='s&p')`` does.
- ``elastic_transform``: OpenCV's ``warpAffine`` is replaced by scipy's exact bilinear
  ``affine_transform`` with the same mirrored border (OpenCV rounds sample positions to 1/32 px).
- ``defocus_blur``: OpenCV's 3x3 Gaussian smoothing of the disk kernel and its ``filter2D`` are
  computed with numpy and ``scipy.ndimage.correlate`` (same kernel, same mirrored border).
- Random numbers come from numpy's ``Generator``, not the global ``np.random`` state: the draws
  follow the same distributions, not the same values as the published files.

Conversions follow the released pipeline: the float result is clipped to [0, 1], scaled by 255 and
truncated to uint8 (``np.uint8``), except for the corruptions computed on 8-bit images by a library
(JPEG and pixelation by Pillow, the ImageMagick motion blur, which rounds). The zoom factors of
``zoom_blur`` are the published ``np.arange(1, stop, 0.01)`` ranges; with floating point, the
first two include their stop (1.06 and 1.11: 7 and 12 factors), the others end at 1.15, 1.2 and 1.25.

Other image sizes: the parameters are CIFAR's, meant for 32x32 images. Those that the released code
ties to the image size (the elastic displacement, the fog map, the glass-blur range, the pixelation
size) follow the image; the pixel-sized ones (blur widths) are used as they are.

Every corruption is ``fn(image, severity, rng) -> image`` (:data:`Corruption`): a uint8 (H, W, 3)
array, a severity 1-5 and a ``numpy.random.Generator``; :func:`corruption_rng` seeds one per
(corruption, severity, image index), so the same images give the same corrupted copies on every run
and in every process.
Defocus, glass, zoom and gaussian blur, snow and the elastic transform need scipy (imported when
first run); without it they are in :data:`UNAVAILABLE`, with the reason, and :data:`CORRUPTIONS`
lacks them.
"""
import difflib
import functools
import importlib.util
import io
import zlib
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ['CORRUPTIONS', 'BENCHMARK', 'BENCHMARK_AVAILABLE', 'EXTRA', 'LEFT_OUT', 'UNAVAILABLE', 'SEVERITIES',
           'corruption_rng', 'corrupt', 'parse_corruptions', 'available_corruptions']

SEVERITIES = (1, 2, 3, 4, 5)

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
"""The signature of every corruption below, ``fn(image, severity, rng) -> image``.

Args:
    image: The clean image, uint8 (H, W, 3) RGB; it is not changed.
    severity: 1 (mildest) to 5; anything else raises ValueError.
    rng: The source of every random draw (:func:`corruption_rng` makes one per copy); the
        deterministic corruptions (the blurs but glass and motion, colour, pixelate, JPEG) ignore it.

Returns:
    The corrupted image, uint8 (H, W, 3).
"""


def _level(values: Sequence, severity: int):
    """The parameter of ``severity`` (1-5) in a five-entry table."""
    if severity not in SEVERITIES:
        raise ValueError(f'severity must be one of 1-5, got {severity!r}')
    return values[severity - 1]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 as the released pipeline does: clip, scale, truncate."""
    return (np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def _ndimage():
    import scipy.ndimage  # optional: only the corruptions that need it import it, when run
    return scipy.ndimage


# ---------------------------------------------------------------------------------------------
# Noise
def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of standard deviation 0.04-0.10 (of the [0, 1] range); the released code's."""
    std = _level((0.04, 0.06, 0.08, 0.09, 0.10), severity)
    x = image / 255.0
    return _to_uint8(x + rng.normal(0.0, std, x.shape))


def shot_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson noise ``Poisson(x * photons) / photons``, 500 down to 50 photons at full scale; the released code's."""
    photons = _level((500, 250, 100, 75, 50), severity)
    return _to_uint8(rng.poisson(image / 255.0 * photons) / photons)


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise, a fraction 0.01-0.07 of the values set to 0 or 1; the released code's."""
    amount = _level((0.01, 0.02, 0.03, 0.05, 0.07), severity)
    x = image / 255.0
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return _to_uint8(np.where(hit, salt.astype(x.dtype), x))


def speckle_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative Gaussian noise ``x + x * N(0, std)``, std 0.06-0.2; the released code's (extra corruption)."""
    std = _level((0.06, 0.10, 0.12, 0.16, 0.20), severity)
    x = image / 255.0
    return _to_uint8(x + x * rng.normal(0.0, std, x.shape))


# ---------------------------------------------------------------------------------------------
# Blur
def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's ``gaussian`` of an (H, W, C) float image: no blur across channels, nearest-pixel
    border, the kernel cut at 4 sigma."""
    return _ndimage().gaussian_filter(x, sigma=(sigma, sigma, 0), mode='nearest', truncate=4.0)


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of sigma 0.4-1 pixel; the released code's (extra corruption)."""
    sigma = _level((0.4, 0.6, 0.7, 0.8, 1.0), severity)
    return _to_uint8(_gaussian(image / 255.0, sigma))


def glass_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, local pixel displacement (1 or 2 passes), blur; what the released code computes (module docstring)."""
    sigma, passes = _level(((0.05, 1), (0.25, 1), (0.4, 1), (0.25, 2), (0.4, 2)), severity)
    x = _to_uint8(_gaussian(image / 255.0, sigma))
    h, w = x.shape[:2]
    # The released loop's range for its largest displacement of 1 pixel (every CIFAR severity).
    rows, cols = np.meshgrid(np.arange(2, h), np.arange(2, w), indexing='ij')
    for _ in range(passes):
        dy, dx = rng.integers(-1, 1, size=(2,) + rows.shape, endpoint=False)
        moved = x.copy()
        moved[rows, cols] = x[rows + dy, cols + dx]
        x = moved
    return _to_uint8(_gaussian(x / 255.0, sigma))


def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """A normalized disk of ``radius`` pixels, smoothed by a 3x3 Gaussian of ``alias_sigma`` (antialiasing)."""
    half = int(np.ceil(radius)) + 1  # one pixel of margin for the smoothing to spread into
    grid = np.arange(-half, half + 1)
    disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    side = np.exp(-1.0 / (2.0 * alias_sigma ** 2))
    taps = np.array([side, 1.0, side]) / (1.0 + 2.0 * side)
    disk = np.apply_along_axis(np.convolve, 0, disk, taps, mode='same')
    return np.apply_along_axis(np.convolve, 1, disk, taps, mode='same')


def defocus_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur by an antialiased disk (a defocused lens) of radius 0.3-1.5 pixels; the released code's, without OpenCV."""
    radius, alias_sigma = _level(((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)), severity)
    kernel = _disk_kernel(radius, alias_sigma)[:, :, None]
    return _to_uint8(_ndimage().correlate(image / 255.0, kernel, mode='mirror'))


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's motion blur of an (H, W, C) float image: each pixel the Gaussian-weighted mean of
    the pixels behind it along ``angle`` degrees (0: along +x, rows growing downwards)."""
    width = 2 * int(np.ceil(radius)) + 1
    taps = np.exp(-np.arange(width) ** 2 / (2.0 * sigma ** 2))
    taps /= taps.sum()
    t = np.deg2rad(angle)
    steps = np.arange(width)
    dxs = np.ceil(steps * np.cos(t) - 0.5).astype(int)
    dys = np.ceil(steps * np.sin(t) - 0.5).astype(int)
    h, w = x.shape[:2]
    padded = np.pad(x, ((width, width), (width, width), (0, 0)), mode='edge')
    out = np.zeros_like(x, dtype=np.float64)
    for tap, dx, dy in zip(taps, dxs, dys):
        out += tap * padded[width + dy:width + dy + h, width + dx:width + dx + w]
    return out


def _round_to_uint8(x: np.ndarray) -> np.ndarray:
    """0-255 floats to uint8, rounded half up as ImageMagick writes 8-bit files."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Motion blur, radius 6-9 px, at a random angle in [-45, 45] degrees; the released code's (module docstring)."""
    radius, sigma = _level(((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5)), severity)
    angle = rng.uniform(-45, 45)
    return _round_to_uint8(_motion_blur(image.astype(np.float64), radius, sigma, angle))


@functools.lru_cache(maxsize=512)
def _zoom_matrix(length: int, factor: float) -> np.ndarray:
    """The linear map of one axis of :func:`_clipped_zoom`: crop the centre ``ceil(length / factor)`` values,
    zoom them by ``factor`` (scipy's bilinear ``zoom``), keep the centre ``length``."""
    crop = int(np.ceil(length / factor))
    start = (length - crop) // 2
    # scipy's order-1 zoom is linear and separable: zooming the identity gives its matrix along one axis
    grown = _ndimage().zoom(np.eye(crop), (factor, 1.0), order=1)
    trim = (grown.shape[0] - length) // 2
    matrix = np.zeros((length, length))
    matrix[:, start:start + crop] = grown[trim:trim + length]
    matrix.setflags(write=False)
    return matrix


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre of an (H, W, C) array by ``factor`` (bilinear), keeping its size: the released
    code's crop, ``scipy.ndimage.zoom(crop, factor, order=1)`` and centre crop, as two small matrix products."""
    h, w = x.shape[:2]
    channels_first = x.transpose(2, 0, 1)
    zoomed = _zoom_matrix(h, float(factor)) @ channels_first @ _zoom_matrix(w, float(factor)).T
    return zoomed.transpose(1, 2, 0).astype(x.dtype)


_ZOOMS = [np.arange(1, stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)]


def zoom_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """The mean of the image and its centre zoomed by 1 to 1.06-1.25 in steps of 0.01; the released code's."""
    factors = _level(_ZOOMS, severity)
    x = (image / 255.0).astype(np.float32)
    zoomed = np.zeros_like(x)
    for factor in factors:
        zoomed += _clipped_zoom(x, factor)
    return _to_uint8((x + zoomed) / (len(factors) + 1))


# ---------------------------------------------------------------------------------------------
# Weather
def _plasma_fractal(size: int, roughness: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) height map in [0, 1] by the diamond-square algorithm on a torus; ``size`` a power of 2.

    Each new point is the mean of its four neighbours plus ``amplitude * U(-amplitude, amplitude)``, the
    amplitude starting at 100 and divided by ``roughness`` at every halving of the step.
    """
    heights = np.zeros((size, size))
    amplitude = 100.0
    step = size
    while step >= 2:
        half = step // 2
        corners = heights[0::step, 0::step]
        below = np.roll(corners, -1, axis=0)
        ring = corners + below + np.roll(corners, -1, axis=1) + np.roll(below, -1, axis=1)
        heights[half::step, half::step] = ring / 4 + amplitude * rng.uniform(-amplitude, amplitude, ring.shape)
        centres = heights[half::step, half::step]
        # points between two corners of a row: the centres above and below, the corners left and right
        ring = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        heights[0::step, half::step] = ring / 4 + amplitude * rng.uniform(-amplitude, amplitude, ring.shape)
        # points between two corners of a column: the centres left and right, the corners above and below
        ring = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        heights[half::step, 0::step] = ring / 4 + amplitude * rng.uniform(-amplitude, amplitude, ring.shape)
        step = half
        amplitude /= roughness
    heights -= heights.min()
    return heights / heights.max()


def fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A plasma-fractal haze of strength 0.2-1.5 added, the image rescaled to its former peak; the released code's."""
    strength, roughness = _level(((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)), severity)
    x = image / 255.0
    h, w = x.shape[:2]
    peak = x.max()
    size = 1 << int(np.ceil(np.log2(max(h, w, 2))))
    x = x + strength * _plasma_fractal(size, roughness, rng)[:h, :w, None]
    return _to_uint8(x * peak / (peak + strength))


def snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Motion-blurred snow flakes added twice (once turned 180 degrees) to a brightened image; the released code's."""
    mean, std, zoom, threshold, radius, sigma, keep = _level((
        (0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)), severity)
    x = (image / 255.0).astype(np.float32)
    h, w = x.shape[:2]
    flakes = _clipped_zoom(rng.normal(mean, std, (h, w, 1)), zoom)
    flakes[flakes < threshold] = 0
    flakes = _to_uint8(flakes).astype(np.float64)  # the layer is blurred as an 8-bit grey image
    flakes = _round_to_uint8(_motion_blur(flakes, radius, sigma, rng.uniform(-135, -45))) / 255.0
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = keep * x + (1 - keep) * np.maximum(x, grey[..., None] * 1.5 + 0.5)
    return _to_uint8(x + flakes + np.rot90(flakes, 2))


# ---------------------------------------------------------------------------------------------
# Colour
def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] to HSV in [0, 1] (scikit-image's convention: hue 0 where the pixel is grey)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(-1)
    spread = value - rgb.min(-1)
    with np.errstate(divide='ignore', invalid='ignore'):
        sat = np.where(spread > 0, spread / np.where(value > 0, value, 1), 0.0)
        safe = np.where(spread > 0, spread, 1)
        hue = np.where(value == b, 4 + (r - g) / safe, np.where(value == g, 2 + (b - r) / safe, (g - b) / safe))
    hue = np.where(spread > 0, (hue / 6) % 1.0, 0.0)
    return np.stack([hue, sat, value], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(..., 3) HSV in [0, 1] back to RGB."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(h * 6)
    f = h * 6 - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sector = sector.astype(int) % 6
    # (red, green, blue) per sector of the hue circle
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, sector[None, ..., None], 0)[0]


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """0.05-0.3 added to the HSV value; the released code's."""
    shift = _level((0.05, 0.1, 0.15, 0.2, 0.3), severity)
    hsv = _rgb_to_hsv(image / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
    return _to_uint8(_hsv_to_rgb(hsv))


def saturate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """HSV saturation scaled by 0.3, 0.1, then 1.5, 2, 2.5 (plus an offset); the released code's (extra corruption).

    Severities 1-2 desaturate and 3-5 oversaturate, so its severities are not one ramp.
    """
    scale, offset = _level(((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)), severity)
    hsv = _rgb_to_hsv(image / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * scale + offset, 0, 1)
    return _to_uint8(_hsv_to_rgb(hsv))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Each channel pulled towards its mean, keeping 0.75 down to 0.15 of the deviation; the released code's."""
    keep = _level((0.75, 0.5, 0.4, 0.3, 0.15), severity)
    x = image / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - means) * keep + means)


# ---------------------------------------------------------------------------------------------
# Digital
def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 affine matrix taking three (x, y) points ``src`` to ``dst``."""
    return np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst).T


def elastic_transform(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A random affine warp, then a smooth random displacement field; the released code's, without OpenCV.

    The affine moves three points by up to 8-3 % of the side, the field displaces by up to 10 % of the
    side; both sample bilinearly with mirrored borders.
    """
    h, w = image.shape[:2]
    side = min(h, w)
    alpha, sigma, shift = (f * side for f in _level(
        ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)), severity))
    nd = _ndimage()
    x = (image / 255.0).astype(np.float32)
    cx, cy, arm = w // 2, h // 2, side // 3
    src = np.array([[cx + arm, cy + arm], [cx + arm, cy - arm], [cx - arm, cy - arm]], dtype=np.float64)
    dst = src + rng.uniform(-shift, shift, src.shape)
    # The warp samples the source at the inverse map of each output pixel, written in (row, column) order.
    forward = np.vstack([_affine_from_points(src, dst), [0, 0, 1]])
    inverse = np.linalg.inv(forward)[:2]
    swap = [1, 0]
    matrix, offset = inverse[np.ix_(swap, swap)], inverse[swap, 2]
    x = np.stack([nd.affine_transform(x[..., c], matrix, offset, order=1, mode='mirror')
                  for c in range(x.shape[2])], -1)
    dx, dy = (nd.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode='reflect', truncate=3) * alpha
              for _ in range(2))
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    coords = np.stack([rows + dy, cols + dx])
    x = np.stack([nd.map_coordinates(x[..., c], coords, order=1, mode='reflect') for c in range(x.shape[2])], -1)
    return _to_uint8(x)


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Box-downscaled to 95-65 % of the side and box-upscaled back (Pillow); the released code's."""
    fraction = _level((0.95, 0.9, 0.85, 0.75, 0.65), severity)
    h, w = image.shape[:2]
    img = Image.fromarray(image).resize((int(w * fraction), int(h * fraction)), Image.BOX)
    return np.asarray(img.resize((w, h), Image.BOX))


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Saved as JPEG at quality 80 down to 40 (Pillow's defaults otherwise) and decoded; the released code's."""
    quality = _level((80, 65, 58, 50, 40), severity)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, 'JPEG', quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert('RGB'))


# ---------------------------------------------------------------------------------------------
# Registry
BENCHMARK = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur', 'motion_blur',
             'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast', 'elastic_transform', 'pixelate',
             'jpeg_compression')
"""The 15 benchmark corruptions of Hendrycks & Dietterich (2019), in their order."""
EXTRA = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
"""Their 4 extra corruptions (held out for validation in the paper)."""

LEFT_OUT = {
    'frost': 'needs the frost photographs of the original code, image files this package does not ship',
    'spatter': 'is built from OpenCV operations (Canny edges, distance transform, histogram equalization); '
               'OpenCV is not a dependency',
}
"""Corruptions of the paper that are not implemented, and why."""

_IMPLEMENTED = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow, fog,
    brightness, contrast, elastic_transform, pixelate, jpeg_compression,
    speckle_noise, gaussian_blur, saturate)}
_NEED_SCIPY = frozenset({'defocus_blur', 'glass_blur', 'zoom_blur', 'snow', 'elastic_transform', 'gaussian_blur'})


def available_corruptions(have_scipy: bool):
    """The corruptions that can and cannot be computed.

    Args:
        have_scipy: Whether scipy is installed; without it the corruptions that need it are unusable.

    Returns:
        (usable {name: fn} in benchmark order then the extras, unusable {name: why}); :data:`LEFT_OUT`
        is always unusable.
    """
    unavailable = dict(LEFT_OUT)
    if not have_scipy:
        unavailable.update({name: 'needs scipy (pip install scipy)' for name in sorted(_NEED_SCIPY)})
    usable = {name: fn for name, fn in _IMPLEMENTED.items() if name not in unavailable}
    return usable, unavailable


CORRUPTIONS: Dict[str, Corruption]
UNAVAILABLE: Dict[str, str]
CORRUPTIONS, UNAVAILABLE = available_corruptions(importlib.util.find_spec('scipy') is not None)
"""CORRUPTIONS: name -> ``fn(image, severity, rng)``, benchmark order then the extras. UNAVAILABLE: name -> why
it cannot be computed here."""
BENCHMARK_AVAILABLE = tuple(name for name in BENCHMARK if name in CORRUPTIONS)
"""What ``all`` means: the benchmark corruptions that can be computed here."""


def corruption_rng(name: str, severity: int, index: int, seed: int = 0) -> np.random.Generator:
    """The random generator of one corrupted copy: a function of (seed, corruption, severity, image index) only.

    Args:
        name: The corruption.
        severity: Its severity.
        index: The image's position in its set.
        seed: Chooses another set of copies.

    Returns:
        A fresh ``numpy.random.Generator``.
    """
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity, index])


def corrupt(image: np.ndarray, name: str, severity: int, index: int, seed: int = 0,
            registry: Optional[Dict[str, Corruption]] = None) -> np.ndarray:
    """Image ``index`` of a set with corruption ``name`` at ``severity``, reproducibly (:func:`corruption_rng`).

    Args:
        image: The clean image, uint8 (H, W, 3).
        name: A corruption of ``registry``.
        severity: 1-5.
        index: The image's position in its set, which seeds its copy.
        seed: Chooses another set of copies.
        registry: name -> corruption; default :data:`CORRUPTIONS`.

    Returns:
        The corrupted image, uint8 (H, W, 3).
    """
    registry = CORRUPTIONS if registry is None else registry
    return registry[name](image, severity, corruption_rng(name, severity, index, seed))


def parse_corruptions(spec: str, registry: Optional[Dict[str, Corruption]] = None) -> List[str]:
    """The corruption names of a setting: ``'none'``, ``'all'`` (:data:`BENCHMARK_AVAILABLE`) or names
    separated by commas, which may include ``all``; duplicates are dropped, the order kept.

    Args:
        spec: The setting, e.g. ``'all'`` or ``'fog,contrast'``.
        registry: name -> corruption the names are looked up in; default :data:`CORRUPTIONS`.

    Returns:
        The names, in the order given; [] for ``'none'``.

    Raises:
        ValueError: An unknown or unavailable name, with the reason or the closest names.
    """
    registry = CORRUPTIONS if registry is None else registry
    words = [w.strip() for w in str(spec).split(',') if w.strip()]
    if not words:
        raise ValueError(f"{spec!r} names no corruption; give 'none', 'all' or names separated by commas")
    if words == ['none']:
        return []
    names = []
    for word in words:
        if word == 'all':
            names += [n for n in BENCHMARK if n in registry]
        elif word in registry:
            names.append(word)
        elif word in UNAVAILABLE:
            raise ValueError(f'{word!r} is not available: it {UNAVAILABLE[word]}')
        else:
            close = difflib.get_close_matches(word, [*registry, 'all', 'none'], n=2)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ''
            raise ValueError(f"{word!r} is not a corruption{hint}; give 'all', 'none' or some of: {', '.join(registry)}")
    return list(dict.fromkeys(names))
