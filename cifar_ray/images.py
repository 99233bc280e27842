"""Image bytes in and out: any image a data source holds or a user uploads, decoded to the
32x32 RGB uint8 pixels the models take (bombs refused before decoding), a batch of them with
its bad rows named by file and row, and lossless PNG encoding.
"""

from __future__ import annotations

import io
import sys

import numpy as np

from cifar_ray.config import CLASS_NAMES, IMAGE_SHAPE
from cifar_ray.errors import DataSourceError


def decode_batch(batch: dict, skip_bad_rows: bool = False) -> dict:
    """Encoded PNG/JPEG bytes -> uint8 HWC images; labels checked against the classes.

    A bad row raises DataSourceError naming its file and row, or, with `skip_bad_rows`,
    is reported on stderr and kept as a black image with `ok == False`.
    """
    images = np.zeros((len(batch["label"]), *IMAGE_SHAPE), np.uint8)
    labels = np.asarray(batch["label"], dtype=np.int64)
    ok = np.ones(len(labels), bool)
    for i, (data, label) in enumerate(zip(batch["image"], labels)):
        try:
            if not 0 <= label < len(CLASS_NAMES):
                raise DataSourceError(f"label {label} is out of range 0..{len(CLASS_NAMES) - 1}")
            images[i] = decode_image(data)
        except DataSourceError as e:
            where = locate_row(batch, i)
            if not skip_bad_rows:
                raise DataSourceError(f"{where}: {e} (fix or remove it, or pass --skip-bad-rows)") from None
            print(f"skipping bad row, {where}: {e}", file=sys.stderr, flush=True)
            ok[i] = False
    decoded = {"image": images, "label": np.where(ok, labels, 0)}
    return {**decoded, "ok": ok} if skip_bad_rows else decoded


def locate_row(batch: dict, i: int) -> str:
    """'<file> row <n>' for row i of a batch: an image file, or the row's place in its
    Parquet file, found by matching its contents (only done for bad rows)."""
    if "path" not in batch:
        return f"row {i} of its batch"
    path = str(batch["path"][i])
    if not path.endswith(".parquet"):
        return path
    import pyarrow.parquet as pq

    image, label = batch["image"][i], int(batch["label"][i])
    offset = 0
    try:
        for chunk in pq.ParquetFile(path).iter_batches(columns=["image", "label"]):
            images, labels = chunk.column("image").to_pylist(), chunk.column("label").to_pylist()
            for n, (other, other_label) in enumerate(zip(images, labels)):
                if other == image and other_label == label:
                    return f"{path} row {offset + n}"
            offset += chunk.num_rows
    except OSError:  # a remote path (bucket/key): the file name alone still helps
        pass
    return path


MAX_IMAGE_PIXELS = 4096 * 4096  # larger headers are refused before decoding (bombs)


def decode_image(data: bytes, resize: bool = False) -> np.ndarray:
    """PNG/JPEG/... bytes -> uint8 32x32x3 RGB, as a browser would show the image: turned
    upright by its EXIF orientation; grayscale, 16-bit, RGBA, CMYK and palette images become
    8-bit RGB; an animated image gives its first frame.

    Training data must already be 32x32; serving (`resize=True`) scales other sizes.
    The size is read from the header first, so a decompression bomb is never decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise DataSourceError("empty image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataSourceError(f"image is {width}x{height}, over the {MAX_IMAGE_PIXELS} pixel limit")
            if (width, height) != IMAGE_SHAPE[:2] and not resize:
                raise DataSourceError(f"image is {width}x{height}, expected 32x32")
            if "exif" in img.info:  # only where there is EXIF: it costs 13% of a decode to look
                img = ImageOps.exif_transpose(img)
            if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit grayscale: its top 8 bits
                img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) >> 8, 0, 255).astype(np.uint8))
            img = img.convert("RGB")
            if img.size != IMAGE_SHAPE[:2]:
                img = img.resize(IMAGE_SHAPE[:2], Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        if isinstance(e, DataSourceError):
            raise
        raise DataSourceError(f"undecodable image ({type(e).__name__}: {e})") from None


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HWC pixels -> PNG bytes (lossless: decode_image gives the same pixels back)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
