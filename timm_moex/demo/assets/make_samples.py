"""Regenerate the demo's sample images in this folder: ``python timm_moex/demo/assets/make_samples.py``.

The drawing is ``timm_moex.demo.cli.make_sample_images`` (procedural, no randomness), so the files
are reproducible byte for byte with the same Pillow and zlib.
"""
from pathlib import Path

from timm_moex.demo.cli import make_sample_images

if __name__ == '__main__':
    here = Path(__file__).resolve().parent
    for name, image in make_sample_images().items():
        image.save(here / name, format='PNG', optimize=True)
        print(f'wrote {here / name}')
