"""Reading image files strictly: a file that cannot be decoded is an error naming it."""
from PIL import Image

__all__ = ['load_image']


def load_image(path: str) -> Image.Image:
    """An RGB image; a file that cannot be decoded raises an error naming it."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except Exception as e:  # noqa: BLE001  PIL raises several types for broken files
        raise RuntimeError(f'cannot read image {path!r}: {type(e).__name__}: {e}') from e
