"""Image references in rows (paths, URLs, base64, `datasets.Image` values) to bounded PIL images.

Every reference a row can hold is read here, with limits: the bytes read (files and
downloads), the time a download may take in all, and the decoded pixel count (a small
compressed file can decode to gigabytes). A reference that cannot be read is a DataError
naming the row and the reference.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from newtune.errors import DataError

MAX_IMAGE_BYTES = 64 * 1024 * 1024  # bytes read from a file, URL or base64 string
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # width x height once decoded (about 192 MB as RGB)
DOWNLOAD_SECONDS = 60.0  # a whole download, redirects included
MAX_REDIRECTS = 5
_CHUNK = 1 << 16
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s_-]+")
_SHOWN = 80  # characters of a reference shown in an error


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what one image reference may cost."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    timeout_s: float = DOWNLOAD_SECONDS


def shown(ref: Any) -> str:
    """A short printable form of a reference for error messages (base64 is cut)."""
    if isinstance(ref, dict):
        path = ref.get("path")
        return f"{{path: {path!r}, bytes: {len(ref.get('bytes') or b'')} bytes}}"
    if isinstance(ref, bytes | bytearray):
        return f"<{len(ref)} bytes>"
    text = str(ref)
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 20]}...({len(text)} characters)"


def load_image(
    ref: Any,
    where: str,
    base_dir: Path | None = None,
    limits: ImageLimits | None = None,
) -> Any:
    """The RGB PIL image a reference names; `where` (e.g. `data.jsonl row 3`) is for errors.

    `ref`: a PIL image; bytes; a `datasets.Image` dict `{bytes, path}`; or a string: a
    `data:` URI, an `http(s)://` or `file://` URL, a path (relative to `base_dir`, the data
    file's folder), or base64 text.
    """
    from PIL import Image

    limits = limits or ImageLimits()
    if isinstance(ref, Image.Image):
        return _checked(ref, ref, where, limits)
    if isinstance(ref, bytes | bytearray):
        return decode_image(bytes(ref), ref, where, limits)
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return decode_image(bytes(ref["bytes"]), ref, where, limits)
        if ref.get("path"):
            return load_image(str(ref["path"]), where, base_dir, limits)
        raise DataError(
            f"{where}: the image {shown(ref)} has neither `bytes` nor `path`; a datasets.Image "
            "value needs one of them"
        )
    if not isinstance(ref, str) or not ref.strip():
        raise DataError(
            f"{where}: an image reference must be a path, URL, base64 string or image, got "
            f"{type(ref).__name__} {shown(ref)}"
        )
    return decode_image(read_reference(ref.strip(), where, base_dir, limits), ref, where, limits)


def read_reference(ref: str, where: str, base_dir: Path | None, limits: ImageLimits) -> bytes:
    """The bytes a string reference names (data URI, URL, path or base64), bounded."""
    scheme = urllib.parse.urlsplit(ref).scheme.lower() if ":" in ref[:12] else ""
    if scheme == "data":
        return _data_uri(ref, where, limits)
    if scheme in ("http", "https"):
        return download(ref, where, limits)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(ref)
        if parsed.netloc not in ("", "localhost"):
            raise DataError(f"{where}: the image URL {shown(ref)} names a remote host; use a path")
        return _read_file(Path(urllib.request.url2pathname(parsed.path)), ref, where, limits)
    if len(scheme) > 1:  # one letter: a Windows drive
        raise DataError(
            f"{where}: the image {shown(ref)} uses the scheme `{scheme}:`; images are read from "
            "paths, file://, http(s):// URLs, data: URIs or base64 text"
        )
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists() and len(ref) >= 64 and "." not in ref[-6:] and _BASE64.fullmatch(ref):
        return _base64(ref, ref, where, limits)
    return _read_file(path, ref, where, limits)


def _read_file(path: Path, ref: str, where: str, limits: ImageLimits) -> bytes:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DataError(
            f"{where}: the image {shown(ref)} ({path}) {what}; relative image paths are read "
            "from the folder of the data file. Fix the path or remove the row"
        )
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise DataError(
            f"{where}: the image {path} is {size} bytes, over the {limits.max_bytes}-byte limit "
            "for one image; shrink it"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{where}: the image {path} cannot be read: {exc}") from exc


def _data_uri(ref: str, where: str, limits: ImageLimits) -> bytes:
    head, sep, payload = ref.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise DataError(
            f"{where}: the image {shown(ref)} is a data: URI that is not base64 "
            "(`data:image/png;base64,...` is expected)"
        )
    return _base64(payload, ref, where, limits)


def _base64(payload: str, ref: str, where: str, limits: ImageLimits) -> bytes:
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise DataError(
            f"{where}: the base64 image {shown(ref)} is over the {limits.max_bytes}-byte limit"
        )
    text = "".join(payload.split())
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{where}: the image {shown(ref)} is not valid base64: {exc}") from exc


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REDIRECTS redirects, never from https to http."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        """The next request, refused when it would leave https."""
        if req.full_url.lower().startswith("https:") and not newurl.lower().startswith("https:"):
            raise urllib.error.HTTPError(newurl, code, "redirect from https to http", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, where: str, limits: ImageLimits) -> bytes:
    """The body of an http(s) URL, bounded in bytes and in total time."""
    deadline = time.monotonic() + limits.timeout_s
    opener = urllib.request.build_opener(_SameSchemeRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "newtune"})
    try:
        with opener.open(request, timeout=limits.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limits.max_bytes:
                raise DataError(
                    f"{where}: the image {shown(url)} is {length} bytes, over the "
                    f"{limits.max_bytes}-byte limit for one image"
                )
            body = bytearray()
            while chunk := response.read(_CHUNK):
                body += chunk
                if len(body) > limits.max_bytes:
                    raise DataError(
                        f"{where}: the image {shown(url)} is over the {limits.max_bytes}-byte limit "
                        "for one image"
                    )
                if time.monotonic() > deadline:
                    raise DataError(
                        f"{where}: downloading the image {shown(url)} took over "
                        f"{limits.timeout_s:g} s; download it once and use the local path"
                    )
            return bytes(body)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DataError(f"{where}: the image {shown(url)} cannot be downloaded: {exc}") from exc


def decode_image(data: bytes, ref: Any, where: str, limits: ImageLimits | None = None) -> Any:
    """The RGB PIL image encoded in `data`, refusing images over the pixel limit before decoding."""
    from PIL import Image, UnidentifiedImageError

    limits = limits or ImageLimits()
    if len(data) > limits.max_bytes:
        raise DataError(
            f"{where}: the image {shown(ref)} is {len(data)} bytes, over the "
            f"{limits.max_bytes}-byte limit for one image"
        )
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"{where}: the image {shown(ref)} has too many pixels ({exc}); images may have at "
            f"most {limits.max_pixels} pixels. Resize it before training"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(
            f"{where}: {shown(ref)} is not an image Pillow can read ({exc}); point the row at "
            "a PNG, JPEG, WebP, GIF or other image file"
        ) from exc
    return _checked(image, ref, where, limits)


def _checked(image: Any, ref: Any, where: str, limits: ImageLimits) -> Any:
    """`image` decoded, upright (EXIF orientation) and RGB, after the pixel-count check."""
    from PIL import Image, ImageOps

    width, height = image.size
    if width * height > limits.max_pixels or width < 1 or height < 1:
        raise DataError(
            f"{where}: the image {shown(ref)} is {width}x{height} pixels; images may have at most "
            f"{limits.max_pixels} pixels (and at least one). Resize it before training"
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{where}: the image {shown(ref)} cannot be decoded ({exc}); the file may be "
            "truncated or corrupt"
        ) from exc
