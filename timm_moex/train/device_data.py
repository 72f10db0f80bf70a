"""Image datasets held whole on the training device and augmented there, a batch at a time.

For CIFAR-size data (50,000 images of 32x32 are 150 MB as uint8) the fastest loader is no
loader: keep every image on the GPU as uint8 and do the CIFAR recipe (random crop with zero
padding, horizontal flip, Cutout, normalization) on whole batches with a few tensor ops. A
small model is then limited by the GPU, not by PIL and worker processes.

:class:`DeviceImageDataset` plugs into a plain ``DataLoader`` (``num_workers=0``, its
``collate_fn``): the loader's sampler still chooses the indices, so ``accelerator.prepare``
shards it across processes, ``use_seedable_sampler`` makes the order resumable and
``gather_for_metrics`` drops the padding of the last eval batch, exactly as for the worker
path. The dataset answers a whole batch of indices at once through ``__getitems__``.

The augmentation draws from the device's default generator, which ``set_seed`` seeds and
``accelerator.save_state`` saves. It works on the CPU too (then it is simply a batched CPU path).
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import load_image

__all__ = ['DeviceImageDataset', 'batch_collate', 'augment_batch', 'stack_images']


def augment_batch(
        images: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        padding: int = 0,
        hflip: float = 0.0,
        cutout: int = 0,
) -> torch.Tensor:
    """The CIFAR recipe on a uint8 batch: random crop of the zero-padded image, flip,
    ``x * scale + shift`` per channel (normalization folded into one affine), Cutout in the
    normalized image.

    Crop and flip are one gather: the window's row and column indices are drawn per sample and
    the column indices reversed for the flipped samples.

    Args:
        images: uint8 images (B, C, H, W).
        scale: Per-channel factor (C,), ``1 / (255 * std)``.
        shift: Per-channel offset (C,), ``-mean / std``.
        padding: Zero padding on each side before the H x W crop; 0 = no crop.
        hflip: Probability that a sample is flipped horizontally.
        cutout: Side of the zeroed square, centred at a uniform random pixel and clipped at the
            border; 0 = off.

    Returns:
        float32 (B, C, H, W) in channels-last memory format.
    """
    b, c, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device).expand(b, h)
    cols = torch.arange(w, device=device).expand(b, w)
    if padding > 0:
        images = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        rows = rows + torch.randint(0, 2 * padding + 1, (b, 1), device=device)
        cols = cols + torch.randint(0, 2 * padding + 1, (b, 1), device=device)
    if hflip > 0:
        flip = torch.rand(b, 1, device=device) < hflip
        cols = torch.where(flip, cols.flip(1), cols)
    nhwc = images.permute(0, 2, 3, 1)
    index = torch.arange(b, device=device)[:, None, None]
    x = nhwc[index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    x = torch.addcmul(shift, x.float(), scale)
    if cutout > 0:
        cy = torch.randint(0, h, (b, 1), device=device)
        cx = torch.randint(0, w, (b, 1), device=device)
        ar_h, ar_w = torch.arange(h, device=device), torch.arange(w, device=device)
        in_rows = (ar_h >= cy - cutout // 2) & (ar_h < cy + (cutout + 1) // 2)  # (B, H)
        in_cols = (ar_w >= cx - cutout // 2) & (ar_w < cx + (cutout + 1) // 2)  # (B, W)
        x = x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[..., None], 0.0)
    return x.permute(0, 3, 1, 2)


def batch_collate(batch):
    """The collate_fn of a :class:`DeviceImageDataset` loader: the dataset already returns a batch.

    Args:
        batch: The (images, targets) that ``__getitems__`` returned.

    Returns:
        ``batch``, unchanged.
    """
    return batch


class DeviceImageDataset(Dataset):
    """uint8 images (N, C, H, W) and int64 targets on ``device``; ``__getitems__`` returns a
    normalized (and, with ``train=True``, augmented) float32 batch, in channels-last memory
    format when ``channels_last``, and its targets.

    Args:
        images: uint8 images (N, C, H, W).
        targets: Class indices (N,).
        mean: Per-channel normalization mean, for pixels in [0, 1].
        std: Per-channel normalization std, for pixels in [0, 1].
        train: Augment with ``padding``, ``hflip`` and ``cutout``; False only normalizes.
        padding: Zero padding of the random crop (train only).
        hflip: Horizontal flip probability (train only).
        cutout: Side of the Cutout square; 0 = off (train only).
        device: Where images and targets are held; None keeps the images' device.
        classes: The class names, kept as ``classes``.
        channels_last: Return batches in channels-last memory format; False makes them contiguous.

    Raises:
        ValueError: ``images`` is not uint8 (N, C, H, W), or targets, mean or std do not match it.
    """

    def __init__(
            self,
            images: torch.Tensor,
            targets: torch.Tensor,
            mean: Sequence[float],
            std: Sequence[float],
            train: bool = False,
            padding: int = 4,
            hflip: float = 0.5,
            cutout: int = 0,
            device: Optional[torch.device] = None,
            classes: Optional[List[str]] = None,
            channels_last: bool = False,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f'images must be a uint8 (N, C, H, W) tensor; got {images.dtype} {tuple(images.shape)}')
        if len(targets) != len(images):
            raise ValueError(f'{len(images)} images but {len(targets)} targets')
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f'mean and std need {images.shape[1]} values each; got {list(mean)} and {list(std)}')
        device = torch.device(device) if device is not None else images.device
        self.images = images.to(device).contiguous()
        self.targets = torch.as_tensor(targets, dtype=torch.long).to(device)
        std_t = torch.tensor(std, dtype=torch.float32, device=device)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32, device=device) / std_t
        self.train = train
        self.padding, self.hflip, self.cutout = (padding, hflip, cutout) if train else (0, 0.0, 0)
        self.classes = classes
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long).to(self.images.device, non_blocking=True)
        x = augment_batch(self.images[index], self.scale, self.shift, self.padding, self.hflip, self.cutout)
        return (x if self.channels_last else x.contiguous()), self.targets[index]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __repr__(self) -> str:
        return (f'{type(self).__name__}({len(self)} images {tuple(self.images.shape[1:])} on {self.images.device}, '
                f'train={self.train}, padding={self.padding}, hflip={self.hflip}, cutout={self.cutout})')


def stack_images(images: Sequence, size: Optional[int] = None, workers: int = 0) -> torch.Tensor:
    """Stack images into one uint8 tensor, decoding files in threads.

    Args:
        images: PIL images, uint8 HWC numpy arrays or file paths.
        size: Side of the output; images of another size are resized (shorter side to ``size``,
            bilinear) and centre-cropped. None keeps the sizes, which must then agree.
        workers: Decoding threads; 0 = as many as CPUs, at most 32.

    Returns:
        uint8 (N, 3, size, size), RGB.

    Raises:
        RuntimeError: A file cannot be decoded (the message names it).
        ValueError: With ``size=None``, the images are of several sizes.
    """
    def one(item) -> np.ndarray:
        img = load_image(item) if isinstance(item, (str, os.PathLike)) else item
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        img = img.convert('RGB')
        if size is not None and img.size != (size, size):
            scale = size / min(img.size)
            img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                             Image.BILINEAR)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)

    workers = workers or min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
        arrays = list(pool.map(one, images, chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f'images of several sizes {sorted(shapes)[:4]}: give size= to resize them')
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
