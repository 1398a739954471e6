"""What an item's image or video is: image files read as 8-bit RGB, videos read as lists of
frames (a folder of frame images, or a video file decoded by PyAV, whose wheels bundle FFmpeg),
their digests, and the PNG files the jobs write."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from .items import IMAGE_SUFFIXES


def read_rgb(path: Path):
    """An image file as an 8-bit RGB PIL image with its content kept, or a ValueError that says
    why not. 8-bit modes convert as PIL converts them (palette, CMYK, YCbCr, LAB, HSV; alpha and
    palette transparency dropped); 16-bit ones (``I;16*``, and ``I`` from a PNG or PPM, which
    hold at most 16 bits) scale 0..65535 to 0..255 and float ones (``F``) 0..1 to 0..255,
    rounding to nearest (PIL's own conversion clips them at 255 instead). Other ``I`` images
    (32-bit or signed integers) and float ones with values outside 0..1 have no range to scale
    from: they fail."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as opened:
            opened.load()
            image, fmt = opened.copy(), opened.format
    except Exception as exc:  # PIL raises several kinds for unreadable / corrupt files
        raise ValueError(f"cannot read image {path}: {exc}") from None
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N") or mode == "I" and fmt in ("PNG", "PPM"):
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"image {path} ({fmt}, mode {mode}) holds values outside 0..65535, "
                             "the range of its 16 bits")
        pixels = np.rint(values / 257)  # 65535 / 255 = 257
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ValueError(f"image {path} ({fmt}, mode F) holds float values in "
                             f"[{values.min()}, {values.max()}]; float images are read as 0..1: "
                             "rescale it to 0..1, or save it with 8 or 16 bits")
        pixels = np.rint(values * 255)
    elif mode == "I":
        raise ValueError(f"image {path} ({fmt}, mode I: 32-bit or signed integers) has no "
                         "defined range to scale to 8 bits: save it with 8 or 16 bits")
    else:
        try:
            return image.convert("RGB")
        except Exception as exc:
            raise ValueError(f"cannot convert image {path} ({fmt}, mode {mode}) to RGB: "
                             f"{exc}") from None
    return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")





def read_video(path: Path) -> list:
    """The frames of a video as 8-bit RGB PIL images, or a ValueError that says why not: a folder
    of frames (image files, in the order of their names, each read by :func:`read_rgb`) or a video
    file decoded by PyAV. An unreadable, corrupt or truncated file, a file without video frames,
    frames of different sizes and an image given where a video is expected are refused."""
    if path.is_dir():
        files = [p for p in sorted(path.iterdir())
                 if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
        if not files:
            raise ValueError(f"frame folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        frames = [read_rgb(p) for p in files]
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"{path} is an image, not a video: this run's pipeline makes videos "
                         "(give a video file or a folder of frames)")
    else:
        frames = _decode(path)
    sizes = sorted({f.size for f in frames})
    if len(sizes) > 1:
        raise ValueError(f"video {path} has frames of different sizes (WxH): {sizes}")
    return frames


def _decode(path: Path) -> list:
    try:
        import av
    except ImportError:
        raise ValueError(f"reading the video file {path} needs PyAV (pip install av, or the "
                         "[bulk] extra); a folder of frames needs nothing") from None
    try:
        with av.open(str(path)) as container:
            streams = container.streams.video
            stream = streams[0] if streams else None
            frames = [] if stream is None else [f.to_image() for f in container.decode(stream)]
            declared = 0 if stream is None else stream.frames  # 0: the container does not say
    except (av.FFmpegError, OSError) as exc:  # corrupt, truncated, not a video, unreadable
        raise ValueError(f"cannot read video {path}: {exc}") from None
    if stream is None:
        raise ValueError(f"cannot read video {path}: it holds no video stream (truncated, or not "
                         "a video?)")
    if not frames or declared and len(frames) != declared:
        raise ValueError(f"cannot read video {path}: {len(frames)} frames decoded"
                         + (f" of the {declared} it declares" if declared else "")
                         + " (truncated or corrupt?)")
    return [f.convert("RGB") for f in frames]


def video_sha256(path: Path) -> str | None:
    """SHA-256 of a video file's bytes, or of a frame folder's frames (names and bytes); None if
    it cannot be read (the item then fails where it is read)."""
    digest = hashlib.sha256()
    try:
        if path.is_dir():
            for frame in sorted(path.iterdir()):
                if frame.suffix.lower() in IMAGE_SUFFIXES and not frame.name.startswith("."):
                    digest.update(f"{frame.name}\n".encode())
                    digest.update(frame.read_bytes())
        else:
            digest.update(path.read_bytes())
    except OSError:
        return None
    return digest.hexdigest()


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_files(item_id: str, prompt: str, image) -> dict[str, bytes]:
    """An image and its prompt as a sidecar, so an output folder can be inverted again."""
    return {f"images/{item_id}.png": png(image), f"images/{item_id}.txt": prompt.encode("utf-8")}


def video_files(item_id: str, prompt: str, frames) -> dict[str, bytes]:
    """A video as a folder of PNG frames (lossless: inverting it again gives the same latents)
    and its prompt as a sidecar."""
    files = {f"videos/{item_id}/{k:05d}.png": png(frame) for k, frame in enumerate(frames)}
    return {**files, f"videos/{item_id}.txt": prompt.encode("utf-8")}
