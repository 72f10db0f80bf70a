"""The MoEx demo: see what moment exchange does to two images.

Image A gives the features (its normalized content), image B gives the moments (mean and
standard deviation)::

    moex-demo A.png B.png -o grid.png          # or: python -m timm_moex.demo A.png B.png
    moex-demo                                  # two photos (scikit-learn's samples), or the package's own

In pixel space the two images are stacked as a batch of two and ``moment_exchange`` runs with
``perm=[1, 0]``: with PONO (the default) every pixel of A keeps its normalized colour and takes
B's per-position mean and standard deviation over R, G and B, and the reverse. In feature
space the same exchange runs on the output of a timm model's stem (random weights, seeded,
unless ``--pretrained``). The grid shows both, with the per-position (PONO) mean and std maps
of the paper's Figure 1.
"""
import argparse
import importlib
import importlib.util
import logging
import math
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..hooks.layers import resolve_moex_layer
from ..ops.moex import MOEX_NORMS, moment_exchange, parse_norm
from ..train.files import atomic_path

__all__ = [
    'exchange_images', 'feature_maps', 'load_image', 'load_pair', 'create_feature_model', 'render_grid',
    'save_png_atomic', 'make_sample_images', 'sample_image_paths', 'default_image_paths', 'main', 'DemoError',
    'PretrainedWeightsError',
]

_log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

SAMPLE_FEATURE_IMAGE = 'sample_features.png'
SAMPLE_MOMENT_IMAGE = 'sample_moments.png'
SAMPLE_SIZE = 96

GRID_COLUMNS = 4
PAD = 6
MIN_PANEL_SIDE = 128
"""Panels of smaller images are enlarged by an integer factor, so that their labels fit."""

_SWAP = (1, 0)  # sample 0 takes sample 1's moments and sample 1 takes sample 0's


class DemoError(Exception):
    """An input or set-up the demo cannot use; the CLI prints it without a traceback (exit code 2)."""


class PretrainedWeightsError(DemoError):
    """Pretrained weights were asked for and could not be loaded (offline, say); exit code 1."""


# ----------------------------------------------------------------------------------------------
# Inputs

def load_image(path: Union[str, os.PathLike], role: str = 'input') -> np.ndarray:
    """Read an image file as float32 RGB in [0, 1], shape (H, W, 3).

    Grayscale, palette and 16-bit images become RGB; transparency is composited over white; the
    EXIF orientation is applied.

    Args:
        path: The image file.
        role: What the image is for ('feature', 'moment'), named in the error messages.

    Returns:
        The image, float32 (H, W, 3) in [0, 1].

    Raises:
        FileNotFoundError: The file does not exist.
        DemoError: Pillow cannot read the file (not an image, truncated, corrupt or too large).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'{role} image not found: {path}')
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise DemoError(f'{role} image {path} is not an image file that Pillow can read') from None
    except Image.DecompressionBombError as e:
        raise DemoError(f'{role} image {path} is too large to open safely: {e}') from None
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports truncated and corrupt files as OSError or SyntaxError.
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise DemoError(f'cannot read {role} image {path}: {reason}') from None
    return _pil_to_rgb(img)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N'):
        gray = np.asarray(img, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        img = img.convert('RGBA')
        img = Image.alpha_composite(Image.new('RGBA', img.size, (255, 255, 255, 255)), img)
    return np.asarray(img.convert('RGB'), dtype=np.float32) / 255.0


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4); uint8 in [0, 255] or floats in [0, 1]."""
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    else:
        raise DemoError(f'image arrays must be uint8 or floating point; got {arr.dtype}')
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise DemoError(f'an image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}')
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:]
        return arr[..., :3] * alpha + (1.0 - alpha)  # over white, as for files
    return arr


def _to_rgb(image: ImageInput, role: str) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    return load_image(image, role)


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(height, width), mode='bicubic', align_corners=False, antialias=True)
    # Bicubic overshoots a little at edges; an input image stays in the valid range.
    return x[0].permute(1, 2, 0).clamp_(0.0, 1.0).numpy()


def _fit_longer_side(height: int, width: int, size: int) -> Tuple[int, int]:
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def load_pair(
        feature_image: ImageInput,
        moment_image: ImageInput,
        size: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """The two images as float32 RGB arrays (H, W, 3) in [0, 1], of the same size.

    The moment image is resized to the (resized) feature image's size; a message is logged when
    their sizes differed.

    Args:
        feature_image: The image that gives the features: a path, a PIL image or an array
            ((H, W), (H, W, 1), (H, W, 3) or (H, W, 4); uint8, or floats in [0, 1]).
        moment_image: The image that gives the moments, in the same forms.
        size: Resize the feature image so that its longer side is this many pixels (aspect kept);
            None keeps its size.

    Returns:
        (feature image, moment image), each float32 (H, W, 3).

    Raises:
        FileNotFoundError: An image file does not exist.
        DemoError: ``size`` is below 1, or an input cannot be read or has a bad dtype or shape.
    """
    if size is not None and size < 1:
        raise DemoError(f'size must be a positive number of pixels; got {size}')
    a = _to_rgb(feature_image, 'feature')
    b = _to_rgb(moment_image, 'moment')
    a_size, b_size = a.shape[:2], b.shape[:2]
    if size is not None:
        a = _resize(a, *_fit_longer_side(*a_size, size))
    if b_size != a_size:
        _log.warning(
            'the moment image is %dx%d and the feature image %dx%d: resizing the moment image to %dx%d',
            b_size[1], b_size[0], a_size[1], a_size[0], a.shape[1], a.shape[0])
    b = _resize(b, *a.shape[:2])
    return a, b


# ----------------------------------------------------------------------------------------------
# Moment exchange in pixel space and in feature space

def _pono_maps(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-position mean and std over channels of (B, C, H, W), as moment_exchange's 'pono' defines them."""
    var, mean = torch.var_mean(x, dim=1, correction=1)
    return mean, (var + eps).sqrt()


def _swap_moments(x: torch.Tensor, norm: str, eps: float, where: str) -> torch.Tensor:
    try:
        return moment_exchange(x, torch.tensor(_SWAP), norm=norm, eps=eps)
    except ValueError as e:
        raise DemoError(f'{where}: {e}') from None


def _check_norm(norm: str) -> None:
    try:
        parse_norm(norm)
    except ValueError as e:
        raise DemoError(str(e)) from None


def exchange_images(
        a: ImageInput,
        b: ImageInput,
        norm: str = 'pono',
        eps: float = 1e-5,
        size: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    """Moment exchange between two images in pixel space.

    The two images are a batch of two, and ``moment_exchange`` runs in float64 with ``perm=[1, 0]``.

    Args:
        a: The image that gives the features (see :func:`load_pair` for the accepted inputs).
        b: The image that gives the moments.
        norm: Any normalization of ``moment_exchange`` that fits three channels: 'pono' (over
            R, G, B at each pixel), 'in' (per channel over the image), 'ln', 'gn3', ...
        eps: Added to the variances.
        size: As in :func:`load_pair`.

    Returns:
        float32 arrays, unclipped: 'a', 'b', 'a_with_b_moments', 'b_with_a_moments' (H, W, 3),
        and the PONO maps of the inputs 'mean_a', 'std_a', 'mean_b', 'std_b' (H, W).

    Raises:
        FileNotFoundError: An image file does not exist.
        DemoError: ``norm`` is unknown or does not fit three channels, or an input is unusable.
    """
    _check_norm(norm)
    a_rgb, b_rgb = load_pair(a, b, size)
    # float64: the exchange divides by per-pixel stds that can be small.
    x = torch.from_numpy(np.stack([a_rgb, b_rgb])).permute(0, 3, 1, 2).double()
    mixed = _swap_moments(x, norm, eps, f'pixel space (3 channels), norm={norm!r}')
    mean, std = _pono_maps(x, eps)
    hwc = mixed.permute(0, 2, 3, 1).float().numpy()
    return {
        'a': a_rgb, 'b': b_rgb,
        'a_with_b_moments': hwc[0], 'b_with_a_moments': hwc[1],
        'mean_a': mean[0].float().numpy(), 'std_a': std[0].float().numpy(),
        'mean_b': mean[1].float().numpy(), 'std_b': std[1].float().numpy(),
    }


def create_feature_model(model_name: str, pretrained: bool = False, seed: int = 0) -> nn.Module:
    """A timm model in eval mode: random weights drawn from ``seed``, or its pretrained weights.

    Args:
        model_name: A timm model name.
        pretrained: Load timm's pretrained weights (downloaded on first use, then cached).
        seed: Seed of the random weights; the caller's random state is left as it was.

    Returns:
        The model, in eval mode.

    Raises:
        DemoError: timm does not know ``model_name``.
        PretrainedWeightsError: The weights cannot be loaded (no network and not in the Hugging
            Face cache, say).
    """
    if not timm.is_model(model_name):
        raise DemoError(f'timm has no model named {model_name!r} (try timm.list_models("resnet*"))')
    if pretrained:
        _log.info('loading pretrained weights of %s (downloaded on first use, then cached)', model_name)
        try:
            model = timm.create_model(model_name, pretrained=True)
        except Exception as e:  # network, hub and file errors all mean the same to the user
            reason = str(e).strip().splitlines()[0].rstrip('.') if str(e).strip() else type(e).__name__
            raise PretrainedWeightsError(
                f'could not load pretrained weights for {model_name!r}: {reason}. timm downloads them on first '
                'use (then they are cached); offline, leave out --pretrained to use random weights.') from None
    else:
        # A seeded draw that leaves the caller's random state as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(model_name, pretrained=False)
    return model.eval()


class _StemReached(Exception):
    pass


def _stem_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` for input x, without running the rest of the network."""
    captured: List[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output)
        raise _StemReached

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        model(x)
    except _StemReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise DemoError(f'the forward pass of {type(model).__name__} never reached {layer!r}')
    return captured[0]


def feature_maps(
        a: ImageInput,
        b: ImageInput,
        model: Union[str, nn.Module] = 'resnet18',
        norm: str = 'pono',
        pretrained: bool = False,
        layer: str = 'stem',
        seed: int = 0,
        eps: float = 1e-5,
        size: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    """Moment exchange between two images in a model's feature space.

    Both images, normalized with the model's ``pretrained_cfg`` mean and std (ImageNet's when it
    has none), go through ``model`` up to ``layer``; the features there, of shape (2, C, h, w)
    (NHWC outputs are permuted), exchange moments with ``norm``.

    Args:
        a: The image that gives the features (see :func:`load_pair` for the accepted inputs).
        b: The image that gives the moments.
        model: A timm name, built by :func:`create_feature_model`, or a module, put in eval mode.
        norm: The normalization of ``moment_exchange`` whose moments are exchanged.
        pretrained: Load pretrained weights (names only).
        layer: 'stem' or a dotted module name (see ``resolve_moex_layer``); its output must be
            (B, C, H, W).
        seed: Seed of the random weights (names only).
        eps: Added to the variances.
        size: As in :func:`load_pair`.

    Returns:
        float32 maps of shape (h, w): the per-position mean and std over channels of A's
        features ('mean_a', 'std_a'), of B's ('mean_b', 'std_b'), and of the exchanged ones
        ('mean_a_with_b_moments', 'std_a_with_b_moments', 'mean_b_with_a_moments',
        'std_b_with_a_moments').

    Raises:
        FileNotFoundError: An image file does not exist.
        DemoError: ``norm``, ``layer`` or an input is unusable, or the layer's output is not
            (B, C, H, W) feature maps.
        PretrainedWeightsError: The pretrained weights cannot be loaded.
    """
    _check_norm(norm)
    a_rgb, b_rgb = load_pair(a, b, size)
    net = create_feature_model(model, pretrained, seed) if isinstance(model, str) else model.eval()
    try:
        name = resolve_moex_layer(net, layer)
    except ValueError as e:
        raise DemoError(str(e)) from None
    cfg = getattr(net, 'pretrained_cfg', None) or {}
    mean = torch.tensor(cfg.get('mean', IMAGENET_DEFAULT_MEAN)).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get('std', IMAGENET_DEFAULT_STD)).view(1, -1, 1, 1)
    x = (torch.from_numpy(np.stack([a_rgb, b_rgb])).permute(0, 3, 1, 2) - mean) / std
    with torch.no_grad():
        feats = _stem_output(net, name, x.float())
    if not isinstance(feats, torch.Tensor) or feats.dim() != 4:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise DemoError(
            f'{type(net).__name__} gives {shape} at {name!r}; the feature maps need a spatial (B, C, H, W) '
            'output, as convolutional stems give (resnet, densenet, efficientnet, convnext, ...)')
    if getattr(net, 'output_fmt', 'NCHW') == 'NHWC':
        feats = feats.permute(0, 3, 1, 2)
    feats = feats.float()
    mixed = _swap_moments(feats, norm, eps, f'feature space ({feats.shape[1]} channels at {name!r}), norm={norm!r}')
    f_mean, f_std = _pono_maps(feats, eps)
    m_mean, m_std = _pono_maps(mixed, eps)
    maps = {
        'mean_a': f_mean[0], 'std_a': f_std[0], 'mean_b': f_mean[1], 'std_b': f_std[1],
        'mean_a_with_b_moments': m_mean[0], 'std_a_with_b_moments': m_std[0],
        'mean_b_with_a_moments': m_mean[1], 'std_b_with_a_moments': m_std[1],
    }
    return {k: v.numpy() for k, v in maps.items()}


# ----------------------------------------------------------------------------------------------
# The grid

# Viridis-like anchors (dark blue, low, to yellow, high): perceptually ordered and readable in grayscale.
_COLORMAP = np.array([
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
], dtype=np.float32) / 255.0


def _colorize(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map values to RGB in [0, 1] through the colormap, lo -> first anchor, hi -> last."""
    t = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
    stops = np.linspace(0.0, 1.0, len(_COLORMAP))
    return np.stack([np.interp(t, stops, _COLORMAP[:, c]) for c in range(3)], axis=-1)


def _to_pil(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), 'RGB')


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> List[str]:
    lines: List[str] = []
    for paragraph in text.split('\n'):
        line = ''
        for word in paragraph.split(' '):
            candidate = f'{line} {word}'.strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _map_rows(
        maps: Dict[str, np.ndarray],
        rows: Sequence[Tuple[str, Sequence[Tuple[str, str]]]],
) -> List[List[Tuple[str, Image.Image]]]:
    """Colour each row of (key, label) maps on one shared scale, so that its panels compare."""
    out = []
    for row_name, cells in rows:
        lo = float(min(maps[k].min() for k, _ in cells))
        hi = float(max(maps[k].max() for k, _ in cells))
        out.append([(f'{label}\n{row_name}, colours {lo:.3g} to {hi:.3g}', _to_pil(_colorize(maps[k], lo, hi)))
                    for k, label in cells])
    return out


def render_grid(
        pixel: Dict[str, np.ndarray],
        features: Optional[Dict[str, np.ndarray]] = None,
        title: str = '',
) -> Image.Image:
    """Draw the labelled panels of ``exchange_images`` (and ``feature_maps``) as one RGB image.

    Rows: the two images and the two exchanged ones (clipped to [0, 1] for display); their
    pixel-space PONO mean and std maps; then, with ``features``, the channel-mean and
    channel-std maps of both images' features and of the exchanged features. The panels of a
    map row share one colour scale (dark blue low, yellow high), written in their labels.
    Columns are ``GRID_COLUMNS`` panels of the image size (enlarged by an integer factor to at
    least ``MIN_PANEL_SIDE``), ``PAD`` pixels apart.

    Args:
        pixel: What :func:`exchange_images` returned.
        features: What :func:`feature_maps` returned; None draws the pixel rows only.
        title: Text drawn above the panels, wrapped to the grid's width; '' for none.

    Returns:
        The grid, an RGB image.
    """
    height, width = pixel['a'].shape[:2]
    zoom = max(1, math.ceil(MIN_PANEL_SIDE / max(height, width)))
    pw, ph = width * zoom, height * zoom
    rows: List[List[Tuple[str, Image.Image]]] = [[
        ('A (features)', _to_pil(pixel['a'])),
        ('B (moments)', _to_pil(pixel['b'])),
        ("A with B's moments", _to_pil(pixel['a_with_b_moments'])),
        ("B with A's moments", _to_pil(pixel['b_with_a_moments'])),
    ]]
    mean_row, std_row = _map_rows(pixel, [
        ('pixels', [('mean_a', 'A: PONO mean'), ('mean_b', 'B: PONO mean')]),
        ('pixels', [('std_a', 'A: PONO std'), ('std_b', 'B: PONO std')]),
    ])
    rows.append(mean_row + std_row)
    if features is not None:
        names = [('a', 'A'), ('b', 'B'), ('a_with_b_moments', "A w/ B's moments"),
                 ('b_with_a_moments', "B w/ A's moments")]
        rows += _map_rows(features, [
            ('features', [(f'mean_{k}', f'{label}: channel mean') for k, label in names]),
            ('features', [(f'std_{k}', f'{label}: channel std') for k, label in names]),
        ])

    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    label_font, title_font = _font(11), _font(13)
    line_h, title_line_h = _line_height(label_font), _line_height(title_font)
    labels = [[_wrap(probe, text, label_font, pw) for text, _ in row] for row in rows]
    label_hs = [max(len(lines) for lines in row) * line_h + 2 for row in labels]
    grid_w = GRID_COLUMNS * pw + (GRID_COLUMNS + 1) * PAD
    title_lines = _wrap(probe, title, title_font, grid_w - 2 * PAD) if title else []
    title_h = len(title_lines) * title_line_h + (PAD if title_lines else 0)
    grid_h = PAD + title_h + sum(label_hs) + len(rows) * (ph + PAD)
    grid = Image.new('RGB', (grid_w, grid_h), 'white')
    draw = ImageDraw.Draw(grid)
    y = PAD
    for line in title_lines:
        draw.text((PAD, y), line, fill='black', font=title_font)
        y += title_line_h
    y += PAD if title_lines else 0
    for row, row_labels, label_h in zip(rows, labels, label_hs):
        for col, ((_, panel), lines) in enumerate(zip(row, row_labels)):
            x = PAD + col * (pw + PAD)
            for i, line in enumerate(lines):
                draw.text((x, y + i * line_h), line, fill='black', font=label_font)
            grid.paste(panel.resize((pw, ph), Image.NEAREST), (x, y + label_h))
        y += label_h + ph + PAD
    return grid


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox('Ag')
    return bottom + 3


def save_png_atomic(image: Image.Image, path: Union[str, os.PathLike]) -> Path:
    """Write ``image`` as a PNG to ``path`` atomically, creating its folder if missing.

    The file is written beside its target and renamed over it (``timm_moex.train.files.atomic_path``),
    so a reader never sees half a file and an earlier grid stays intact when writing fails.

    Args:
        image: The image.
        path: The PNG file to write or replace.

    Returns:
        ``path``, as a Path.

    Raises:
        OSError: The folder or the file cannot be written; no temporary file is left behind.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format='PNG')
    return path


# ----------------------------------------------------------------------------------------------
# The sample images the package ships (timm_moex/demo/assets/)

def make_sample_images(size: int = SAMPLE_SIZE) -> Dict[str, Image.Image]:
    """The two sample images, drawn procedurally (no randomness), by file name.

    The feature image has sharp structure with colour at every pixel (PONO of a gray pixel is
    flat, so it would carry no content): a two-colour checkerboard with a striped disc. The
    moment image is smooth: a colour gradient with soft blobs.

    Args:
        size: The side of both (square) images, in pixels.

    Returns:
        {file name (``SAMPLE_FEATURE_IMAGE``, ``SAMPLE_MOMENT_IMAGE``): RGB image}.
    """
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size  # pixel centres in (0, 1)

    checker = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2)[..., None]
    red, teal = np.array([0.90, 0.30, 0.20]), np.array([0.10, 0.55, 0.70])
    feature = checker * red + (1 - checker) * teal
    disc = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.3 ** 2)[..., None]
    stripes = (np.floor((xx + yy) * 10) % 2)[..., None]
    stripe_colours = stripes * np.array([0.95, 0.85, 0.20]) + (1 - stripes) * np.array([0.35, 0.10, 0.55])
    feature = np.where(disc, stripe_colours, feature)

    def blob(cx: float, cy: float, radius: float) -> np.ndarray:
        return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius ** 2))

    moment = np.stack([
        0.15 + 0.75 * xx,
        0.20 + 0.60 * blob(0.3, 0.7, 0.18) + 0.15 * yy,
        0.85 - 0.60 * yy + 0.10 * blob(0.75, 0.25, 0.15),
    ], axis=-1)
    moment += 0.25 * blob(0.7, 0.3, 0.12)[..., None] * np.array([1.0, 0.8, -0.4])

    return {SAMPLE_FEATURE_IMAGE: _to_pil(feature), SAMPLE_MOMENT_IMAGE: _to_pil(moment)}


def sample_image_paths() -> Tuple[Path, Path]:
    """The shipped sample images: (feature image, moment image)."""
    assets = Path(str(resources.files(__package__).joinpath('assets')))
    return assets / SAMPLE_FEATURE_IMAGE, assets / SAMPLE_MOMENT_IMAGE


def default_image_paths() -> Tuple[Path, Path]:
    """The images ``moex-demo`` uses when given none: (feature image, moment image).

    Real photos show the exchange better than drawn samples: scikit-learn bundles two (a temple
    and a flower, no download needed), used when it is installed (``pip install timm-moex[quickstart]``).
    Without it, the package's own drawn samples.

    Returns:
        The feature image's path and the moment image's path.
    """
    if importlib.util.find_spec('sklearn') is None:
        return sample_image_paths()
    photos = importlib.import_module('sklearn.datasets').load_sample_images().filenames
    by_name = {Path(f).name: Path(f) for f in photos}
    if {'china.jpg', 'flower.jpg'} <= set(by_name):
        return by_name['flower.jpg'], by_name['china.jpg']
    return sample_image_paths()


# ----------------------------------------------------------------------------------------------
# Command line

def _norm_arg(value: str) -> str:
    try:
        parse_norm(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f'expected a positive whole number of pixels; got {value!r}')
    return number


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f'expected a number >= 0; got {value!r}')
    return number


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='moex-demo',
        description='See what Moment Exchange (MoEx) does to two images: the feature image keeps its '
                    "normalized content and takes the moment image's moments (mean and std), in pixel "
                    "space and in a timm model's feature space. Without images it uses two sample photos.")
    parser.add_argument('images', nargs='*', metavar='IMAGE',
                        help='FEATURE_IMAGE MOMENT_IMAGE: two image files (any mode: grayscale and RGBA '
                             "become RGB); none for two sample photos (scikit-learn's, else the package's own)")
    parser.add_argument('-o', '--output', default='moex_demo.png', help='grid PNG to write, its folder created if missing (default: %(default)s)')
    parser.add_argument('--norm', type=_norm_arg, default='pono',
                        help=f'normalization whose moments are exchanged, one of {", ".join(MOEX_NORMS)} '
                             '(default: %(default)s)')
    parser.add_argument('--pixel-norm', type=_norm_arg, default=None,
                        help='normalization in pixel space (3 channels, so pono, in, ln, gn3, gn-d3); '
                             'default: --norm')
    parser.add_argument('--model', default='resnet18', help='timm model whose stem gives the feature space (default: %(default)s)')
    parser.add_argument('--layer', default='stem', help="module whose output is the feature space: 'stem' or a "
                                                        'dotted module name (default: %(default)s)')
    parser.add_argument('--pretrained', action='store_true',
                        help='load pretrained weights (downloaded on first use); default: random weights')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random weights (default: %(default)s)')
    parser.add_argument('--size', type=_positive_int, default=256,
                        help='longer side, in pixels, that the feature image is resized to, aspect kept '
                             '(default: %(default)s)')
    parser.add_argument('--eps', type=_non_negative_float, default=1e-5, help='added to the variances (default: %(default)s)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``moex-demo`` command: writes the grid and prints its path.

    Args:
        argv: The command line without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0, 2 for unusable inputs (one line on stderr), 1 when pretrained weights
        cannot be loaded. A bad command line exits through argparse (status 2).
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if len(args.images) not in (0, 2):
        parser.error(f'give two images (FEATURE_IMAGE MOMENT_IMAGE) or none; got {len(args.images)}')

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('moex-demo: %(message)s'))
    _log.addHandler(handler)
    level = _log.level
    _log.setLevel(logging.INFO)
    try:
        return _run(args)
    except FileNotFoundError as e:
        print(f'moex-demo: error: {e}', file=sys.stderr)
        return 2
    except PretrainedWeightsError as e:
        print(f'moex-demo: error: {e}', file=sys.stderr)
        return 1
    except DemoError as e:
        print(f'moex-demo: error: {e}', file=sys.stderr)
        return 2
    finally:
        _log.removeHandler(handler)
        _log.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    if args.images:
        feature_path, moment_path = (Path(p) for p in args.images)
    else:
        feature_path, moment_path = default_image_paths()
        _log.info('no images given: using the samples %s and %s', feature_path.name, moment_path.name)
    pixel_norm = args.pixel_norm or args.norm
    a, b = load_pair(feature_path, moment_path, args.size)
    pixel = exchange_images(a, b, norm=pixel_norm, eps=args.eps)
    model = create_feature_model(args.model, args.pretrained, args.seed)
    features = feature_maps(a, b, model, norm=args.norm, layer=args.layer, eps=args.eps)
    weights = 'pretrained weights' if args.pretrained else f'random weights, seed {args.seed}'
    layer = resolve_moex_layer(model, args.layer)
    title = (f'MoEx: A = {feature_path.name} (features), B = {moment_path.name} (moments). '
             f'Pixels: norm={pixel_norm}. Features: {args.model} ({weights}) at {layer!r}, norm={args.norm}.')
    grid = render_grid(pixel, features, title)
    try:
        out = save_png_atomic(grid, args.output)
    except OSError as e:  # a read-only folder, a full disk, a file where a folder should be, ...
        reason = f'{e.strerror}: {e.filename}' if e.strerror and e.filename else e
        raise DemoError(f'cannot write {args.output}: {reason}') from None
    print(f'moex-demo: wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
