"""What an image_url may name and what the server refuses, each with its reason: real files decoded by Pillow,
a real HTTP server on loopback for remote URLs."""

import asyncio
import base64
import io
import threading
from functools import partial
from http.server import HTTPServer, SimpleHTTPRequestHandler

import pytest
from PIL import Image

from serving.images import ImageError, ImageLimits, load_image


def png(width: int = 20, height: int = 10) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def noisy_png() -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (40, 40), bytes(range(256)) * 18 + bytes(192)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def limits(tmp_path=None, **changes) -> ImageLimits:
    settings = dict(max_bytes=100_000, max_pixels=10_000, allow_remote=True, fetch_timeout=5.0, local_root=tmp_path)
    return ImageLimits(**(settings | changes))


def load(url: str, image_limits: ImageLimits) -> Image.Image:
    return asyncio.run(load_image(url, image_limits))


@pytest.fixture
def web_root(tmp_path):
    """A loopback HTTP server over tmp_path; yields its base URL."""
    server = HTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_data_url_a_remote_url_and_an_allowed_file_give_the_same_image(tmp_path, web_root):
    (tmp_path / "red.png").write_bytes(png())
    images = [load(data_url(png()), limits()), load(f"{web_root}/red.png", limits()),
              load(str(tmp_path / "red.png"), limits(tmp_path)), load(f"file://{tmp_path}/red.png", limits(tmp_path))]
    assert {image.size for image in images} == {(20, 10)}
    assert {image.mode for image in images} == {"RGB"}
    assert all(image.getpixel((3, 3)) == (200, 30, 30) for image in images)


@pytest.mark.parametrize("url, settings, reason", [
    (data_url(b"just some text"), {}, "not an image"),
    (data_url(noisy_png()[:len(noisy_png()) // 2]), {}, "corrupt"),
    (data_url(png(200, 100)), {}, "--max-image-pixels"),
    (data_url(noisy_png()), {"max_bytes": 100}, "--max-image-mb"),
    ("data:image/png,not-base64", {}, "base64-encoded"),
    ("data:image/png;base64,@@@@", {}, "not valid base64"),
    ("http://127.0.0.1:9/red.png", {"allow_remote": False}, "--allow-remote-images false"),
    ("/etc/passwd", {}, "--allowed-local-media-path"),
    ("ftp://example.com/a.png", {}, "not ftp:"),
])
def test_bad_images_are_refused_with_the_reason(url, settings, reason):
    with pytest.raises(ImageError, match=reason):
        load(url, limits(**settings))


def test_remote_failures_and_escapes_from_the_allowed_folder_are_refused(tmp_path, web_root):
    (tmp_path / "big.png").write_bytes(png(100, 100))
    with pytest.raises(ImageError, match="HTTP 404"):
        load(f"{web_root}/missing.png", limits())
    with pytest.raises(ImageError, match="--max-image-mb"):
        load(f"{web_root}/big.png", limits(max_bytes=200))
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    with pytest.raises(ImageError, match="must lie in"):
        load(str(allowed / ".." / "big.png"), limits(allowed))
    with pytest.raises(ImageError, match="no image file"):
        load(str(allowed / "none.png"), limits(allowed))
