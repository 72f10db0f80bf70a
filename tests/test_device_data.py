"""The device loader: the CIFAR recipe done on whole batches of uint8 images held on the device."""
import pickle

import pytest
import torch
from torchvision import transforms

from timm_moex.train.data import FileListDataset
from timm_moex.train.device_data import DeviceImageDataset, augment_batch, batch_collate, stack_images
from timm_moex.train.errors import UnreadableImage

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def affine():
    std = torch.tensor(STD)
    return 1.0 / (255.0 * std), -torch.tensor(MEAN) / std


def images(n=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_no_augmentation_is_torchvision_normalize():
    x = images()
    out = augment_batch(x, *affine())
    reference = transforms.Normalize(MEAN, STD)(x.float() / 255)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32


def test_crop_is_a_window_of_the_zero_padded_image():
    x, pad = images(n=16), 3
    torch.manual_seed(1)
    out = augment_batch(x, *affine(), padding=pad)
    scale, shift = affine()
    pixels = ((out.permute(0, 2, 3, 1) - shift) / scale).permute(0, 3, 1, 2).round()
    padded = torch.nn.functional.pad(x, (pad,) * 4).float()
    offsets = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], pixels[i])]
        assert len(hits) == 1, f'sample {i}: not one window of the padded image'
        offsets.add(hits[0])
    assert len(offsets) > 4  # the offsets are drawn per sample


def test_flip():
    x = images()
    always = augment_batch(x, *affine(), hflip=1.0)
    torch.testing.assert_close(always, augment_batch(x, *affine()).flip(3))
    torch.manual_seed(0)
    half = augment_batch(images(n=200), *affine(), hflip=0.5)
    plain = augment_batch(images(n=200), *affine())
    flipped = (half != plain).flatten(1).any(1)
    torch.testing.assert_close(half[flipped], plain[flipped].flip(3))
    assert 60 < flipped.sum() < 140


@pytest.mark.parametrize('size', [1, 4, 5])
def test_cutout_zeroes_one_square_clipped_at_the_border(size):
    x = torch.full((64, 3, 10, 10), 255, dtype=torch.uint8)  # normalized values are all positive
    torch.manual_seed(2)
    out = augment_batch(x, *affine(), cutout=size)
    assert (out >= 0).all()
    holes = (out == 0).all(1)  # (B, H, W), every channel zeroed together
    assert torch.equal(holes, (out == 0).any(1))
    sides = set()
    for hole in holes:
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= size and 1 <= len(cols) <= size
        assert hole.sum() == len(rows) * len(cols)  # a rectangle
        assert torch.equal(rows, torch.arange(rows[0], rows[-1] + 1))
        sides.add((len(rows), len(cols)))
    assert (size, size) in sides  # whole squares away from the border
    if size > 1:
        assert len(sides) > 1  # and clipped ones at it


def test_dataset_through_a_dataloader():
    data = DeviceImageDataset(images(n=10), torch.arange(10), MEAN, STD, train=True, padding=2, hflip=0.5,
                              cutout=2)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, drop_last=True, collate_fn=batch_collate)
    batches = list(loader)
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (4, 3, 8, 8) and x.is_contiguous() and y.dtype == torch.long
    assert len(set(torch.cat([b[1] for b in batches]).tolist())) == 8
    evaluation = DeviceImageDataset(images(n=10), torch.arange(10), MEAN, STD, train=False, padding=2, cutout=2,
                                    channels_last=True)
    x, y = evaluation.__getitems__([3, 1])
    torch.testing.assert_close(x, augment_batch(images(n=10)[[3, 1]], *affine()))
    assert y.tolist() == [3, 1] and x.is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match='uint8'):
        DeviceImageDataset(images().float(), torch.arange(6), MEAN, STD)
    with pytest.raises(ValueError, match='6 images but 5 targets'):
        DeviceImageDataset(images(), torch.arange(5), MEAN, STD)
    with pytest.raises(ValueError, match='mean and std need 3 values'):
        DeviceImageDataset(images(), torch.arange(6), (0.5,), STD)


def test_stack_images_resizes_and_names_a_broken_file(tmp_path):
    from PIL import Image
    Image.new('RGB', (12, 10), (10, 20, 30)).save(tmp_path / 'a.png')
    Image.new('L', (8, 8), 200).save(tmp_path / 'b.png')
    out = stack_images([tmp_path / 'a.png', str(tmp_path / 'b.png')], size=8)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.uint8
    assert out[0, :, 0, 0].tolist() == [10, 20, 30] and out[1].eq(200).all()
    (tmp_path / 'c.png').write_bytes(b'not an image')
    with pytest.raises(UnreadableImage, match=rf"cannot be decoded \({tmp_path / 'c.png'}: UnidentifiedImageError"):
        stack_images([tmp_path / 'a.png', tmp_path / 'c.png'], size=8)


@pytest.mark.parametrize('workers', [0, 1])
def test_an_unreadable_image_stays_a_data_error_across_the_worker_boundary(workers, tmp_path):
    """A DataLoader worker's error reaches the main process rebuilt from its traceback's text (it used to become a
    RuntimeError there); an UnreadableImage comes back as itself, naming the file, with the data exit code."""
    (bad := tmp_path / 'bad.jpg').write_text('not an image')
    loader = torch.utils.data.DataLoader(FileListDataset([(str(bad), 0)], ['a']), num_workers=workers)
    with pytest.raises(UnreadableImage) as err:
        next(iter(loader))
    assert err.value.exit_code == 7 and err.value.path == str(bad)
    assert str(err.value) == (f"an image file cannot be decoded ({bad}: UnidentifiedImageError: cannot identify image "
                              f"file '{bad}'): replace or remove the file (a truncated copy, or not an image)")
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is UnreadableImage and str(again) == str(err.value)


@pytest.mark.parametrize('loader', ['workers', 'device'])
def test_train_limit_takes_a_fixed_subset(loader, image_folder):
    from timm_moex.train import load_config
    from timm_moex.train.data import create_datasets
    cfg = load_config(['--dataset', 'imagefolder', '--data-dir', str(image_folder), '--img-size', '32',
                       '--loader', loader, '--train-limit', '10', '--eval-limit', '5'], check_paths=False)
    train_set, eval_set, n = create_datasets(cfg, torch.device('cpu'))
    assert (len(train_set), len(eval_set), n) == (10, 5, 2)
    again, _, _ = create_datasets(cfg, torch.device('cpu'))
    targets = lambda ds: [int(ds[i][1]) for i in range(len(ds))]  # noqa: E731
    assert targets(train_set) == targets(again) and set(targets(train_set)) == {0, 1}
    assert train_set[0][0].shape == (3, 32, 32)


def test_label_noise_changes_the_asked_fraction_to_other_classes(image_folder):
    from torchvision import datasets
    from timm_moex.train.data import add_label_noise
    clean = datasets.ImageFolder(str(image_folder / 'train'))
    noisy = datasets.ImageFolder(str(image_folder / 'train'))
    changed = add_label_noise(noisy, 0.25, num_classes=2)
    assert len(changed) == 8  # 25% of 32
    differs = [i for i, (a, b) in enumerate(zip(clean.targets, noisy.targets)) if a != b]
    assert sorted(differs) == sorted(changed.tolist())  # a changed label never keeps its class
    assert [t for _, t in noisy.samples] == noisy.targets
    again = datasets.ImageFolder(str(image_folder / 'train'))
    add_label_noise(again, 0.25, num_classes=2)
    assert again.targets == noisy.targets  # the same draw every time


def test_label_noise_reaches_training(image_folder):
    from timm_moex.train import load_config
    from timm_moex.train.data import create_datasets
    base = ['--dataset', 'imagefolder', '--data-dir', str(image_folder), '--img-size', '32', '--loader', 'device']
    clean, clean_eval, _ = create_datasets(load_config(base, check_paths=False), torch.device('cpu'))
    noisy, evaluation, _ = create_datasets(load_config([*base, '--label-noise', '0.5'], check_paths=False),
                                           torch.device('cpu'))
    assert (clean.targets != noisy.targets).sum() == 16
    assert torch.equal(evaluation.targets, clean_eval.targets)  # the eval labels stay clean


def test_label_noise_is_independent_of_the_train_subset():
    """train_limit's subset and the noisy samples are separate draws: the subset holds about rate noisy labels."""
    from timm_moex.train.data import _limit, add_label_noise

    class Labels(torch.utils.data.Dataset):
        classes = [str(i) for i in range(10)]

        def __init__(self):
            self.targets = [i % 10 for i in range(5000)]

        def __len__(self):
            return len(self.targets)

    clean, noisy = Labels(), Labels()
    add_label_noise(noisy, 0.2, 10)
    subset = _limit(noisy, 1000)
    fraction = sum(noisy.targets[i] != clean.targets[i] for i in subset.indices) / 1000
    assert 0.15 < fraction < 0.25
