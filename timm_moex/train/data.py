"""Datasets, transforms, loaders and batch mixing for train_moex.py.

Datasets (``cfg.dataset``):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download),
  upscaled to 32x32 RGB, split once with a fixed seed into 1,437 train / 360 test images.
- ``cifar10`` / ``cifar100``: torchvision's datasets in ``data_dir`` (``download: true`` fetches them).
- ``imagefolder``: ``data_dir/train/<class>/*`` and ``data_dir/test/`` (or ``val/``).
- ``imagenet``: the ImageNet folder layout found by ``timm.data.create_dataset``
  (``train/`` and ``val/`` or ``validation/``).

Images from files are read strictly: a corrupt file raises an error naming its path (timm's own
``ImageDataset`` would skip it with a warning).

Train transforms (``cfg.aug_recipe``): ``cifar`` is the CIFAR recipe (RandomCrop with 4-pixel
zero padding, horizontal flip, optional AutoAugment / RandAugment, normalize, optional Cutout
and RandomErasing; on the 32 px datasets an ``img_size`` other than 32 resizes the images first);
``imagenet`` is timm's ``create_transform`` (RandomResizedCrop, flip, color
jitter, RandAugment / AutoAugment, RandomErasing); ``none`` uses the eval transform.
"""
import os
import re
from typing import Callable, List, Optional, Sequence, Tuple
from urllib.error import URLError

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_dataset, create_transform
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from .config import TrainConfig
from .device_data import DeviceImageDataset, batch_collate, stack_images
from .errors import ConfigError, DataError, first_line
from .images import load_image

__all__ = ['DATASET_STATS', 'check_data_dir', 'check_auto_augment', 'DigitsDataset', 'FileListDataset', 'Cutout',
           'resolve_data_defaults', 'device_loader_unsupported', 'create_transforms', 'resolve_loader', 'add_label_noise', 'create_datasets',
           'create_loaders', 'create_mixup']

# (mean, std) of each dataset's images.
DATASET_STATS = {
    'digits': ((0.3047,) * 3, (0.3235,) * 3),  # the 1,797 upscaled 32x32 images of DigitsDataset
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # The PyramidNet / CutMix / MoEx code's values, used there for CIFAR-100.
    'cifar100': ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
}
_SMALL_DATASETS = ('digits', 'cifar10', 'cifar100')  # 32x32 images: no resize, the cifar recipe
_SMALL_SIZE = 32
_CIFAR_FOLDERS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}
_EVAL_SPLITS = ('test', 'val', 'validation')


# ---------------------------------------------------------------------------------------------
# Where the data is
def _eval_folder(root: str) -> Optional[str]:
    for split in _EVAL_SPLITS:
        if os.path.isdir(os.path.join(root, split)):
            return os.path.join(root, split)
    return None


def check_data_dir(cfg: TrainConfig) -> None:
    """Check that ``cfg.dataset`` can be found under ``cfg.data_dir``.

    CIFAR needs its torchvision folder (or ``download: true``); imagefolder and imagenet need
    ``train/`` and one of ``test/``, ``val/``, ``validation/``. digits needs nothing.

    Args:
        cfg: The run's configuration (``dataset``, ``data_dir``, ``download``).

    Raises:
        DataError: The dataset's files or folders are not there.
    """
    root = cfg.data_dir
    if cfg.dataset in _CIFAR_FOLDERS:
        folder = os.path.join(root, _CIFAR_FOLDERS[cfg.dataset])
        if not cfg.download and not os.path.isdir(folder):
            raise DataError(f'data_dir: no {cfg.dataset} files', os.path.abspath(folder),
                            f'set download: true (--download) to let torchvision fetch them into data_dir={root!r} '
                            f'(needs internet), or point --data-dir at the folder that holds '
                            f'{_CIFAR_FOLDERS[cfg.dataset]}/')
    elif cfg.dataset in ('imagefolder', 'imagenet'):
        missing = ([] if os.path.isdir(os.path.join(root, 'train')) else ['train/']) + \
            ([] if _eval_folder(root) is not None else ['/, '.join(_EVAL_SPLITS[:-1]) + f'/ or {_EVAL_SPLITS[-1]}/'])
        if missing:
            raise DataError(f'data_dir: no {" and no ".join(missing)} for dataset={cfg.dataset!r}',
                            os.path.abspath(root), 'give --data-dir the folder that holds train/ and test/ (or val/), '
                            'one sub-folder per class in each')


# ---------------------------------------------------------------------------------------------
# Datasets
class FileListDataset(Dataset):
    """(path, class index) samples read with :func:`load_image`.

    Args:
        samples: (image path, class index) pairs.
        classes: The class names, in class-index order.
        transform: Applied to each PIL image; None returns the image itself.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: List[str], transform: Optional[Callable] = None):
        self.samples, self.classes, self.transform = list(samples), list(classes), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = load_image(path)
        return (self.transform(img) if self.transform else img), target


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as 32x32 RGB PIL images; a fixed split of 1,437 train / 360 test.

    Args:
        train: The training split; False gives the 360 test images.
        transform: Applied to each PIL image; None returns the image itself.
        size: Side in pixels the 8x8 images are upscaled to (bilinear).
        seed: Seed of the stratified train / test split.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, train: bool = True, transform: Optional[Callable] = None, size: int = 32, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        digits = load_digits()
        index = np.arange(len(digits.target))
        train_idx, test_idx = train_test_split(index, test_size=360, random_state=seed, stratify=digits.target)
        idx = train_idx if train else test_idx
        pixels = (digits.images[idx] * (255.0 / 16.0)).round().astype(np.uint8)
        self.images = [Image.fromarray(p).resize((size, size), Image.BILINEAR).convert('RGB') for p in pixels]
        self.targets = digits.target[idx].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self.images[index]
        return (self.transform(img) if self.transform else img), self.targets[index]


# ---------------------------------------------------------------------------------------------
# Transforms
class Cutout:
    """Zero one ``size`` x ``size`` square, centred at a uniform random pixel and clipped at the
    border, in a normalized CHW tensor (DeVries & Taylor, 2017; 16 px on CIFAR).

    Args:
        size: Side of the square in pixels.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = torch.randint(h, ()).item(), torch.randint(w, ()).item()
        y0, y1 = max(cy - self.size // 2, 0), min(cy + (self.size + 1) // 2, h)
        x0, x1 = max(cx - self.size // 2, 0), min(cx + (self.size + 1) // 2, w)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0
        return img

    def __repr__(self) -> str:
        return f'Cutout(size={self.size})'


def resolve_data_defaults(cfg: TrainConfig) -> Tuple[int, Tuple[float, ...], Tuple[float, ...], str]:
    """The input size, normalization and train recipe, with the dataset's defaults filled in.

    Args:
        cfg: The run's configuration; ``img_size``, ``mean``, ``std`` left unset and
            ``aug_recipe: auto`` take the dataset's values.

    Returns:
        (img_size, mean, std, aug_recipe): 32 px for digits / CIFAR, else 224; the dataset's
        mean and std (ImageNet's for folders); 'cifar' up to 64 px, else 'imagenet'.
    """
    img_size = cfg.img_size or (32 if cfg.dataset in _SMALL_DATASETS else 224)
    mean, std = DATASET_STATS.get(cfg.dataset, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    mean, std = tuple(cfg.mean or mean), tuple(cfg.std or std)
    recipe = cfg.aug_recipe if cfg.aug_recipe != 'auto' else ('cifar' if img_size <= 64 else 'imagenet')
    return img_size, mean, std, recipe


def _policy(name: str, mean: Sequence[float]) -> Callable:
    """torchvision's CIFAR-10 AutoAugment policy, or a timm policy string (RandAugment, AutoAugment, AugMix)."""
    if name == 'cifar10':
        return transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10)
    hparams = dict(translate_const=10, img_mean=tuple(round(255 * m) for m in mean))
    if name.startswith('rand'):
        return rand_augment_transform(name, hparams)
    if name.startswith('augmix'):
        return augment_and_mix_transform(name, hparams)
    return auto_augment_transform(name, hparams)


# The sections after the first of timm's policy strings, '<key><value>', as timm.data.auto_augment's parsers
# (rand_augment_transform, augment_and_mix_transform, auto_augment_transform) read them; they skip a section they
# do not know without a word, so check_auto_augment refuses it. {family: (name, example, {key: value})}.
_POLICY_SECTIONS = {
    'rand': ('RandAugment', 'rand-m9-mstd0.5',
             {'m': 'int', 'n': 'int', 'p': 'float', 'mstd': 'float', 'mmax': 'int', 'inc': '0|1'}),
    'augmix': ('AugMix', 'augmix-m5-w4-d2', {'m': 'int', 'w': 'int', 'd': 'int', 'a': 'float', 'b': '0|1',
                                             'mstd': 'float'}),
    'auto': ('AutoAugment', 'original-mstd0.5', {'mstd': 'float'}),
}
_RAND_TRANSFORM_SETS = ('weights', '3a', '3aw')  # RandAugment's t<name>; timm takes another name for the default set
_AUTO_AUGMENT_POLICIES = ('original', 'originalr', 'v0', 'v0r', '3a')


def check_auto_augment(policy: str) -> None:
    """Check an ``auto_augment`` value: 'cifar10', or a timm policy string every section of which timm reads.

    Args:
        policy: The value, e.g. 'rand-m9-mstd0.5', 'original', 'augmix-m5-w4-d2'.

    Raises:
        ConfigError: An unknown policy, a section the policy's parser would skip, or a value it cannot read; the
            message lists the accepted sections.
    """
    if policy == 'cifar10':
        return
    family = 'rand' if policy.startswith('rand') else 'augmix' if policy.startswith('augmix') else 'auto'
    name, example, keys = _POLICY_SECTIONS[family]
    head, *sections = policy.split('-')
    bad = f"auto_augment: {policy!r} is not a timm policy string nor 'cifar10'"
    if head not in ((family,) if family != 'auto' else _AUTO_AUGMENT_POLICIES):
        raise ConfigError(f"{bad}: it starts with 'rand' (RandAugment), 'augmix' (AugMix) or an AutoAugment policy "
                          f"({', '.join(_AUTO_AUGMENT_POLICIES)}), e.g. 'rand-m9-mstd0.5', 'original', "
                          f"'augmix-m5-w4-d2'")
    for section in sections:
        if family == 'rand' and section.startswith('t'):  # read before the numeric keys, as timm does
            known = section[1:] in _RAND_TRANSFORM_SETS
        else:
            key = re.match(r'(\D*)\d', section)  # timm's key: the text before the first digit
            known = key is not None and key.group(1) in keys
        if not known:
            accepted = [f'{k}<{v}>' for k, v in keys.items()]
            if family == 'rand':
                accepted.append(f"t<{'|'.join(_RAND_TRANSFORM_SETS)}>")
            raise ConfigError(f"{bad}: {name} does not read the section {section!r} (timm would skip it); its "
                              f"sections are {', '.join(accepted)}, e.g. {example!r}")
    try:
        _policy(policy, IMAGENET_DEFAULT_MEAN)
    except Exception as e:  # noqa: BLE001  timm raises assorted errors for a value it cannot read
        raise ConfigError(f"{bad}: {first_line(e)}") from None


def create_transforms(cfg: TrainConfig) -> Tuple[Callable, Callable]:
    """The PIL-image transforms of the worker loader for ``cfg.aug_recipe`` (see the module docstring).

    Args:
        cfg: The run's configuration.

    Returns:
        (train transform, eval transform); with ``aug_recipe: none`` both are the eval transform.
    """
    img_size, mean, std, recipe = resolve_data_defaults(cfg)
    # The 32 px datasets are resized only to another img_size (the device loader does the same).
    resize = [] if cfg.dataset in _SMALL_DATASETS and img_size == _SMALL_SIZE else \
        [transforms.Resize(img_size), transforms.CenterCrop(img_size)]
    if recipe == 'imagenet':
        common = dict(input_size=img_size, interpolation=cfg.interpolation, mean=mean, std=std, crop_pct=cfg.crop_pct)
        train = create_transform(is_training=True, hflip=cfg.hflip, color_jitter=cfg.color_jitter or 0.0,
                                 auto_augment=cfg.auto_augment or None, re_prob=cfg.reprob, re_mode=cfg.remode,
                                 **common)
        if cfg.cutout:
            train = transforms.Compose([train, Cutout(cfg.cutout)])
        return train, create_transform(is_training=False, **common)

    to_tensor = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    eval_tf = transforms.Compose(resize + to_tensor)
    if recipe == 'none':
        return eval_tf, eval_tf
    train = resize + [transforms.RandomCrop(img_size, padding=cfg.crop_padding)]
    if cfg.hflip > 0:
        train.append(transforms.RandomHorizontalFlip(cfg.hflip))
    if cfg.auto_augment:
        train.append(_policy(cfg.auto_augment, mean))
    train += to_tensor
    if cfg.cutout:
        train.append(Cutout(cfg.cutout))
    if cfg.reprob > 0:
        train.append(RandomErasing(cfg.reprob, mode=cfg.remode, device='cpu'))
    return transforms.Compose(train), eval_tf


def device_loader_unsupported(cfg: TrainConfig) -> str:
    """Why the settings need the worker loader rather than the device loader.

    Args:
        cfg: The run's configuration.

    Returns:
        The reason, a phrase that follows "loader: 'device'" in an error message (ImageNet,
        images over 64 px, a recipe other than cifar / none, AutoAugment, RandomErasing); ''
        when the device loader can do them.
    """
    if cfg.dataset == 'imagenet':
        return "does not hold ImageNet-size datasets (dataset: imagenet)"
    img_size, _, _, recipe = resolve_data_defaults(cfg)
    if img_size > 64:
        return f'is for images of at most 64 px, not img_size={img_size}'
    if recipe not in ('cifar', 'none'):
        return f'does the cifar recipe only, not aug_recipe={recipe!r}'
    if cfg.auto_augment:
        return f'has no AutoAugment / RandAugment (auto_augment={cfg.auto_augment!r})'
    if cfg.reprob > 0:
        return f'has no RandomErasing (reprob={cfg.reprob})'
    return ''


def resolve_loader(cfg: TrainConfig, device: Optional[torch.device] = None) -> str:
    """The loader to use: ``cfg.loader``, with ``auto`` decided.

    Args:
        cfg: The run's configuration.
        device: The training device; ``loader: auto`` is 'device' only on a CUDA device and only
            when :func:`device_loader_unsupported` has no objection.

    Returns:
        'workers' or 'device'.
    """
    if cfg.loader != 'auto':
        return cfg.loader
    on_gpu = device is not None and torch.device(device).type == 'cuda'
    return 'device' if on_gpu and not device_loader_unsupported(cfg) else 'workers'


def _raw_datasets(cfg: TrainConfig):
    """(train, eval) datasets without transforms, and the class names."""
    if cfg.dataset == 'digits':
        return DigitsDataset(True), DigitsDataset(False), DigitsDataset.classes
    if cfg.dataset in _CIFAR_FOLDERS:
        cls = datasets.CIFAR10 if cfg.dataset == 'cifar10' else datasets.CIFAR100
        try:
            train_set = cls(cfg.data_dir, train=True, download=cfg.download)
            eval_set = cls(cfg.data_dir, train=False, download=cfg.download)
        except OSError as e:  # urllib's URLError / HTTPError (offline, a refused address), a connection cut
            if not cfg.download:
                raise
            archive = os.path.join(cfg.data_dir, cls.filename)
            if os.path.isfile(archive) and not check_integrity(archive, cls.tgz_md5):
                os.remove(archive)  # torchvision writes the archive in place: a cut download leaves part of it
            reason = e.reason if type(e) is URLError else e  # an HTTPError's own text names the status
            raise DataError(f'{cfg.dataset}: the download failed', reason, 'download it while online, or put the '
                            f'dataset in {os.path.abspath(cfg.data_dir)}') from None
        except RuntimeError as e:  # torchvision: missing or corrupt files
            raise DataError(f'{cfg.dataset}: the files cannot be used ({first_line(e)})', os.path.abspath(cfg.data_dir),
                            'download: true (--download) fetches them again') from None
        return train_set, eval_set, train_set.classes
    if cfg.dataset == 'imagefolder':
        train_set = _image_folder(os.path.join(cfg.data_dir, 'train'))
        eval_dir = _eval_folder(cfg.data_dir)
        eval_set = _image_folder(eval_dir)
        if eval_set.class_to_idx != train_set.class_to_idx:
            only_train = sorted(set(train_set.class_to_idx) - set(eval_set.class_to_idx))
            only_eval = sorted(set(eval_set.class_to_idx) - set(train_set.class_to_idx))
            raise DataError(f'train/ and {os.path.basename(eval_dir)}/ hold different classes',
                            f'{os.path.abspath(cfg.data_dir)}: only in train/ {only_train}, only in '
                            f'{os.path.basename(eval_dir)}/ {only_eval}',
                            'give both the same class folders')
        return train_set, eval_set, train_set.classes
    # imagenet: timm finds the layout (train/ + val/ or validation/, class folders, tar files)
    readers = [create_dataset('', root=cfg.data_dir, split=s).reader for s in ('train', 'validation')]
    classes = sorted(readers[0].class_to_idx, key=readers[0].class_to_idx.get)
    return FileListDataset(readers[0].samples, classes), FileListDataset(readers[1].samples, classes), classes


def _image_folder(root: str) -> datasets.ImageFolder:
    """torchvision's ImageFolder read with :func:`load_image`; a missing or empty class folder is a DataError."""
    try:
        return datasets.ImageFolder(root, loader=load_image)
    except FileNotFoundError as e:  # no class folder, or a class folder without images
        raise DataError('no images to read', f'{os.path.abspath(root)}: {e}',
                        'put the images in one sub-folder per class (remove empty class folders)') from None


def add_label_noise(dataset: Dataset, rate: float, num_classes: int, seed: int = 1) -> torch.Tensor:
    """Give ``round(rate * len(dataset))`` samples a uniformly drawn other class, in place.

    Changes ``targets`` and, for file datasets, ``samples`` (and ``imgs``).

    Args:
        dataset: A dataset with ``targets`` or ``samples`` of (path, class index).
        rate: The fraction of samples whose label is replaced.
        num_classes: The number of classes the other class is drawn from.
        seed: Seed of the draw of the samples and of their new classes.

    Returns:
        The indices of the changed samples.
    """
    samples = getattr(dataset, 'samples', None)
    targets = torch.as_tensor(list(dataset.targets) if hasattr(dataset, 'targets') else [t for _, t in samples])
    # Not seed 0: that is the draw of train_limit's subset, and the noisy samples must not be its first ones.
    g = torch.Generator().manual_seed(seed)
    changed = torch.randperm(len(targets), generator=g)[:round(rate * len(targets))]
    # Adding 1..K-1 modulo K never gives back the true class.
    targets[changed] = (targets[changed] + torch.randint(1, num_classes, (len(changed),), generator=g)) % num_classes
    noisy = targets.tolist()
    if hasattr(dataset, 'targets'):
        dataset.targets = noisy
    if samples is not None:
        dataset.samples = [(path, t) for (path, _), t in zip(samples, noisy)]
        if hasattr(dataset, 'imgs'):
            dataset.imgs = dataset.samples
    return changed


class _Subset(torch.utils.data.Subset):
    """A Subset that passes ``transform`` to its dataset and keeps its ``classes``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        super().__init__(dataset, indices)
        self.classes = dataset.classes

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value


def _limit(dataset: Dataset, limit: int) -> Dataset:
    """A fixed random subset (seed 0) of ``limit`` samples; the dataset itself when 0 or not smaller."""
    if not limit or limit >= len(dataset):
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    return _Subset(dataset, sorted(indices.tolist()))


def _to_device_dataset(cfg: TrainConfig, raw: Dataset, train: bool, device) -> DeviceImageDataset:
    img_size, mean, std, recipe = resolve_data_defaults(cfg)
    index = list(range(len(raw)))
    if isinstance(raw, _Subset):
        raw, index = raw.dataset, list(raw.indices)
    if isinstance(raw, datasets.CIFAR10):  # CIFAR100 too: the uint8 arrays are in memory already
        data = raw.data[index]
        images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous() if data.shape[1] == img_size else \
            stack_images(list(data), img_size)
        targets = [raw.targets[i] for i in index]
    elif isinstance(raw, DigitsDataset):
        images, targets = stack_images([raw.images[i] for i in index], img_size), [raw.targets[i] for i in index]
    else:  # files (ImageFolder): decoded once, in threads
        samples = [raw.samples[i] for i in index]
        images, targets = stack_images([p for p, _ in samples], img_size), [t for _, t in samples]
    return DeviceImageDataset(images, torch.as_tensor(targets), mean, std, train=train and recipe == 'cifar',
                              padding=cfg.crop_padding, hflip=cfg.hflip, cutout=cfg.cutout, device=device,
                              classes=raw.classes, channels_last=cfg.channels_last)


def create_datasets(cfg: TrainConfig, device: Optional[torch.device] = None) -> Tuple[Dataset, Dataset, int]:
    """The train and eval sets of ``cfg.dataset``, with label noise, limits and transforms applied.

    Args:
        cfg: The run's configuration.
        device: The training device; with the device loader (:func:`resolve_loader`) both sets
            are :class:`~timm_moex.train.device_data.DeviceImageDataset` s held there.

    Returns:
        (train set, eval set, number of classes): ``cfg.num_classes`` or the dataset's count.

    Raises:
        ConfigError: ``num_classes`` is fewer than the dataset's classes.
        DataError: An image folder has no images, train/ and the eval folder hold different classes, the dataset
            has a single class, or torchvision cannot read or download the CIFAR files.
    """
    train_set, eval_set, classes = _raw_datasets(cfg)
    if len(classes) < 2:  # every label the same: the loss reaches 0 and the error 0 % with nothing learned
        raise DataError('the training set holds a single class, nothing to classify',
                        f'{os.path.abspath(cfg.data_dir)}: only {classes[0] if classes else None!r}',
                        'give at least two classes (one sub-folder per class in train/ and in the evaluation folder)')
    if cfg.label_noise > 0:
        add_label_noise(train_set, cfg.label_noise, len(classes))
    train_set, eval_set = _limit(train_set, cfg.train_limit), _limit(eval_set, cfg.eval_limit)
    if resolve_loader(cfg, device) == 'device':
        train_set = _to_device_dataset(cfg, train_set, True, device)
        eval_set = _to_device_dataset(cfg, eval_set, False, device)
    else:
        train_set.transform, eval_set.transform = create_transforms(cfg)
    if cfg.num_classes and cfg.num_classes < len(classes):  # the loss would index past the classifier
        raise ConfigError(f'num_classes: {cfg.num_classes} is fewer than the {len(classes)} classes of the dataset; '
                          f'leave it out (the dataset\'s count) or give at least {len(classes)}')
    num_classes = cfg.num_classes or len(classes)
    return train_set, eval_set, num_classes


def create_loaders(cfg: TrainConfig, train_set: Dataset, eval_set: Dataset) -> Tuple[DataLoader, DataLoader]:
    """Per-process loaders; the train loader drops its last incomplete batch (Mixup needs even batches).

    A :class:`~timm_moex.train.device_data.DeviceImageDataset` is read in the main process, a batch per call.

    Args:
        cfg: The run's configuration (batch sizes, workers, pin_memory).
        train_set: The training set, shuffled.
        eval_set: The evaluation set, in order; batches of ``eval_batch_size`` (default twice ``batch_size``).

    Returns:
        (train loader, eval loader).

    Raises:
        DataError: The batch is larger than the training set (unless ``eval_only``), or the eval set is empty.
    """
    if isinstance(train_set, DeviceImageDataset):
        common = dict(num_workers=0, collate_fn=batch_collate)
    else:
        common = dict(num_workers=cfg.workers, pin_memory=cfg.pin_memory, persistent_workers=cfg.workers > 0)
    train = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, **common)
    evaluation = DataLoader(eval_set, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, shuffle=False, **common)
    if len(train) == 0 and not cfg.eval_only:
        raise DataError('the batch is larger than the training set', f'batch_size {cfg.batch_size}, '
                        f'{len(train_set)} training images', 'give a smaller --batch-size (or more --train-limit)')
    if len(eval_set) == 0:
        raise DataError('the evaluation set is empty', f'{cfg.dataset}, eval_limit {cfg.eval_limit}',
                        'give evaluation images (test/ or val/) or a positive --eval-limit')
    return train, evaluation


def create_mixup(cfg: TrainConfig, num_classes: int):
    """timm's Mixup/CutMix (soft targets, label smoothing included), or None when both are off.

    timm pairs sample i with sample B-1-i (``x.flip(0)``) and returns soft targets
    ``lam * y_i + (1 - lam) * y_{B-1-i}`` (smoothed).

    Args:
        cfg: The run's configuration (mixup, cutmix and their probabilities, mode, smoothing).
        num_classes: The number of classes of the soft targets.

    Returns:
        A ``timm.data.Mixup``, or None when ``cfg.mixing`` is off.
    """
    if not cfg.mixing:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)
