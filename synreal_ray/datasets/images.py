"""Decoding image and label files: the one place that opens them with PIL and applies the pixel
limit, so an oversized file (a decompression bomb, or a corrupt header claiming a huge size) is a
per-sample error naming the file, never a crash of the stage or an out-of-memory worker. Also
`by_shape`, which groups decoded images of equal sizes into the batches the models run.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

# Images larger than this many pixels are refused. Far above real datasets (Cityscapes frames are
# 2048 x 1024 = 2**21 pixels), far below what would exhaust a worker's memory (2**28 RGB pixels
# decode to 768 MiB). The features stage sets its own with `max_pixels` / `--max-pixels`.
MAX_PIXELS = 2**28


def by_shape(images) -> dict[tuple, list[int]]:
    """The positions of the images (arrays) of each shape, in order: the models run each group as
    one batch, so a list of mixed sizes needs no resizing."""
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    return groups


class ImageError(ValueError):
    """A file that cannot be decoded, or is over the pixel limit; the message names the file."""


def decode_image(data: bytes, uri: str, what: str = "image", max_pixels: int | None = None,
                 load: bool = True) -> Image.Image:
    """Open `data` (the bytes of `uri`) with PIL, refusing more than `max_pixels` pixels (default
    `MAX_PIXELS`). `load=False` parses the header only (size and mode, no pixels).

    PIL's limit is the global `Image.MAX_IMAGE_PIXELS`: it is set for this call and put back after,
    here and nowhere else. That is safe in this project's Ray tasks and actors, which decode on one
    thread; code decoding on several threads at once must not call this concurrently."""
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            # PIL warns above the limit and raises only above twice it: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if load:
                img.load()
            return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        size = re.search(r"\((\d+) pixels\)", str(e))  # PIL's message names the size, and its own limit
        raise ImageError(f"{uri}: {what} of {size[1] + ' pixels' if size else 'too many pixels'} is over the "
                         f"limit of {limit} (max_pixels, --max-pixels; a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{uri}: unreadable {'or truncated ' if load else ''}{what} ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
