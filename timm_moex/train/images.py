"""Reading image files strictly: a file that cannot be decoded is an error naming it."""
import os

from PIL import Image

from .errors import UnreadableImage, describe

__all__ = ['load_image']


def load_image(path: str) -> Image.Image:
    """An RGB image, decoded whole.

    Args:
        path: The image file.

    Returns:
        The image, converted to RGB.

    Raises:
        UnreadableImage: The file cannot be decoded (truncated, or not an image); it names the file, and survives
            the way from a DataLoader worker to the main process.
    """
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except Exception as e:  # noqa: BLE001  PIL raises several types for broken files
        raise UnreadableImage(os.path.abspath(path), describe(e)) from None
