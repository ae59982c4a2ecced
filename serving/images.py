"""Images named in chat messages (image_url parts): fetched from a data: URL, an http(s) URL (off the event loop,
with a timeout and a size cap) or a file in --allowed-local-media-path, decoded and checked with Pillow on a
worker thread. Every failure is an ImageError saying what is wrong, for a 400 naming the message part."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    pass


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    allow_remote: bool
    fetch_timeout: float
    local_root: Path | None  # the folder local image paths must lie in; None: no local paths


async def load_image(url: str, limits: ImageLimits) -> Image.Image:
    """The image an image_url names, as RGB."""
    data = await image_bytes(url, limits)
    return await asyncio.to_thread(decode_image, data, limits.max_pixels)


async def image_bytes(url: str, limits: ImageLimits) -> bytes:
    if url.startswith("data:"):
        return data_url_bytes(url, limits.max_bytes)
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise ImageError("remote image URLs are turned off on this server (--allow-remote-images false)")
        return await fetch(url, limits)
    if scheme in ("file", ""):
        return local_bytes(Path(unquote(urlparse(url).path) if scheme == "file" else url), limits)
    raise ImageError(f"an image URL must be a data: URL or an http(s) URL (or a file path where the server allows "
                     f"one), not {scheme}:")


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ImageError("a data: URL of an image must be base64-encoded (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError(f"the image is larger than this server's limit of {max_bytes / 1e6:g} MB (--max-image-mb)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ImageError(f"the data: URL is not valid base64 ({error})") from None


async def fetch(url: str, limits: ImageLimits) -> bytes:
    try:
        async with httpx.AsyncClient(timeout=limits.fetch_timeout, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ImageError(f"fetching the image gave HTTP {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limits.max_bytes:
                        raise ImageError(f"the image is larger than this server's limit of "
                                         f"{limits.max_bytes / 1e6:g} MB (--max-image-mb)")
                return bytes(data)
    except httpx.TimeoutException:
        raise ImageError(f"fetching the image took longer than {limits.fetch_timeout:g} s") from None
    except httpx.HTTPError as error:
        raise ImageError(f"the image could not be fetched: {error}") from None


def local_bytes(path: Path, limits: ImageLimits) -> bytes:
    root = limits.local_root
    if root is None:
        raise ImageError("local image paths are turned off on this server (see --allowed-local-media-path)")
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ImageError(f"local images must lie in {root} (--allowed-local-media-path)")
    if not resolved.is_file():
        raise ImageError(f"no image file at {path}")
    if resolved.stat().st_size > limits.max_bytes:
        raise ImageError(f"the image is larger than this server's limit of {limits.max_bytes / 1e6:g} MB "
                         "(--max-image-mb)")
    return resolved.read_bytes()


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("this is not an image the server can read (PNG, JPEG, WebP, GIF, ...)") from None
    width, height = image.size  # read from the header: nothing is decoded yet
    if width * height > max_pixels:
        raise ImageError(f"the image has {width} x {height} = {width * height} pixels, more than this server's limit "
                         f"of {max_pixels} (--max-image-pixels)")
    try:
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"the image is corrupt: {error}") from None
