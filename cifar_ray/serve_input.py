"""What a prediction request carries, read and checked: image bytes or JSON pixels -> uint8 images.

Every problem becomes an HTTPException with the status and a one-line reason the client
sees (400 undecodable, 413 too large, 415 wrong type, 422 wrong shape or values); none
takes the replica down. The reading functions run on the replica's event loop (they only
await the body); the parsing ones are plain functions that serve.py runs on its compute
threads.
"""

import asyncio
import hmac
import json
from typing import Any

import numpy as np
from fastapi import HTTPException
from starlette.requests import Request

from cifar_ray.config import CLASS_NAMES, IMAGE_SHAPE

IMAGE_TYPES = ("image/", "application/octet-stream")
CLOSE = {"Connection": "close"}  # the answer ends the connection


def check_token(request: Request, token: str | None) -> None:
    """401, before anything is read or computed, unless the request carries the API token
    (when one is set). Compared in constant time."""
    if token is None:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def pixels_to_batch(images: Any) -> np.ndarray:
    """Nested lists of 0-255 HWC pixels -> uint8 batch, or a 422 saying what is wrong."""
    if not isinstance(images, list) or not images:
        raise HTTPException(422, "expected a non-empty list of images")
    if len(images) > 256:
        raise HTTPException(413, "at most 256 images per request")
    try:
        array = np.asarray(images, dtype=np.float32)
    except (ValueError, TypeError):
        raise HTTPException(422, "pixels must be numbers in equally sized nested lists") from None
    if array.shape[1:] != IMAGE_SHAPE:
        raise HTTPException(422, f"each image must be {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]} "
                                 f"(HWC), got {list(array.shape[1:])}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise HTTPException(422, "pixels must be finite numbers from 0 to 255")
    return np.rint(array).astype(np.uint8)


def parse_json_images(body: bytes) -> tuple[np.ndarray, bool]:
    """A /predict/json body -> (uint8 batch, whether it named one "image" rather than "images")."""
    try:
        payload = json.loads(body, parse_constant=reject_constant)
    except (ValueError, RecursionError) as e:
        raise HTTPException(400, f"invalid JSON ({type(e).__name__})") from None
    if not isinstance(payload, dict) or len(payload.keys() & {"image", "images"}) != 1:
        raise HTTPException(422, 'expected a JSON object with "image" or "images"')
    single = "image" in payload
    return pixels_to_batch([payload["image"]] if single else payload["images"]), single


def parse_feedback(body: bytes) -> tuple[str, int]:
    """POST /feedback's `{"request_id": "...", "label": 3 or "cat"}` -> (request id, class index)."""
    try:
        feedback = json.loads(body, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        raise HTTPException(400, "body is not JSON") from None
    if not isinstance(feedback, dict) or not isinstance(feedback.get("request_id"), str):
        raise HTTPException(422, 'expected {"request_id": "<id of an answer>", "label": <class index or name>}')
    label = feedback.get("label")
    if isinstance(label, str) and label in CLASS_NAMES:
        label = CLASS_NAMES.index(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(CLASS_NAMES):
        raise HTTPException(422, f"label must be a class index 0-{len(CLASS_NAMES) - 1} or one of "
                                 f"{', '.join(CLASS_NAMES)}; got {label!r}")
    return feedback["request_id"], label


def decode_upload(data: bytes) -> np.ndarray:
    from cifar_ray.errors import DataSourceError
    from cifar_ray.images import decode_image

    try:
        return decode_image(data, resize=True)
    except DataSourceError as e:
        raise HTTPException(400, str(e)) from None


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes (declared or sent),
    and with 408 unless it has all come within `timeout_s`. Both close the connection: else the
    server would go on reading what the client still sends (a slow client, byte by byte)."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise HTTPException(413, f"body over the {limit}-byte limit", headers=CLOSE)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPException(413, f"body over the {limit}-byte limit", headers=CLOSE)
    except TimeoutError:
        raise HTTPException(408, f"request body not received within {timeout_s:g} s", headers=CLOSE) from None
    if not body:
        raise HTTPException(400, "empty body")
    return bytes(body)


async def read_image_bytes(request: Request, limit: int, timeout_s: float) -> bytes:
    """The image file of a multipart upload (field `file`) or of a raw image/* body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await read_upload(request, limit, timeout_s)
    if content_type.startswith(IMAGE_TYPES):
        return await read_body(request, limit, timeout_s)
    raise HTTPException(415, f"unsupported content type {content_type or '(none)'!r}; send "
                        "multipart/form-data, image/* or use /predict/json")


async def read_upload(request: Request, limit: int, timeout_s: float) -> bytes:
    body = await read_body(request, limit, timeout_s)  # enforces the size limit before parsing

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form()
    except Exception as e:
        raise HTTPException(400, f"malformed multipart body ({e})") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, "multipart body has no file field named 'file'")
    return await upload.read()
