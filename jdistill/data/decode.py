"""Image decoding: one function, used at preparation and in the training pipeline alike.

mmdetection loads images with OpenCV (`cv2.IMREAD_COLOR`): grayscale, palette, RGBA and CMYK
files all become 3-channel colour, and a truncated JPEG decodes with a warning (the missing
rows are filled). Here PIL does the same, so that:
- preparation (the builders) decodes every image exactly as training will, and finds every
  damaged file before a step is compiled;
- a truncated or corrupt file is either decoded tolerantly, with a warning naming it (the
  default, as OpenCV), or refused with an error naming it (`data.strict_images=True`);
- a file that cannot be decoded at all is refused, or skipped and counted by the builder.

Images decoded tolerantly are stored re-encoded as PNG (lossless), so the training pipeline
decodes exactly those pixels without any tolerance switch in its worker threads.
"""

import contextlib
import io
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# PIL's truncation switch is a module global: tolerant decodes hold this lock so that two of
# them never restore it under each other. Strict decodes take no lock (the worker threads stay
# parallel); in strict mode the switch is never turned on.
_TOLERANT = threading.Lock()


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded (or, strictly, that is damaged); names the file."""


def _to_rgb(im):
    """A PIL image in any mode -> [H, W, 3] uint8, as OpenCV's IMREAD_COLOR."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: OpenCV keeps the top 8 bits when it reads colour 8-bit.
        arr = np.asarray(im, np.uint32) >> 8
        return np.repeat(np.clip(arr, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, P, RGBA (alpha dropped), CMYK, LA, 1
    return np.asarray(im, np.uint8)


def _cause(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _strict(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _to_rgb(im)


@contextlib.contextmanager
def _truncated_allowed():
    with _TOLERANT:
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old


def decode(data, *, name, strict=False):
    """Decodes encoded image bytes as training will.

    Args:
      data: the file's bytes (JPEG, PNG, ...).
      name: the file (or record) named in warnings and errors.
      strict: refuse a damaged (e.g. truncated) file instead of decoding it tolerantly.
    Returns:
      (image [H, W, 3] uint8 RGB, warning: '' for a clean decode, else one line naming the
      damage).
    Raises:
      ImageDecodeError naming `name` when the bytes are not a decodable image, or when they are
      damaged and `strict` is set.
    """
    data = bytes(data)
    if not data:
        raise ImageDecodeError(f"{name}: empty image file (0 bytes)")
    try:
        return _strict(data), ""
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"{name}: not an image PIL can read (unknown format)") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        damage = f"{name}: damaged image ({_cause(e)})"
    if strict:
        raise ImageDecodeError(f"{damage}; refused because data.strict_images=True")
    try:
        with _truncated_allowed():
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                image = _to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{damage}; not decodable even tolerantly ({_cause(e)})") from e
    return image, f"{damage}; decoded tolerantly, as OpenCV would"


def header_size(f):
    """(height, width) of an image file read from its header, without decoding the pixels.

    Args:
      f: a binary file object at the file's start.
    Returns:
      (height, width) as `decode` gives them, or None when PIL cannot parse the header; then
      `decode` gives the verdict (it may still decode a damaged file tolerantly, or say why it
      cannot).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                width, height = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # UnidentifiedImageError is an OSError
    return height, width


def encode_png(image):
    """[H, W, 3] uint8 -> PNG bytes (lossless), for images decoded tolerantly."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
