"""Items and where they come from: ids, shards of ids, manifests, folders of images or videos
(frame folders and video files) and prompt lists. Problems with the job as a whole (a malformed
manifest, duplicated ids, images for a video pipeline) raise :class:`BulkError`, before anything
is written."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


class BulkError(Exception):
    """A problem with the job as a whole: reported before anything is written (exit code 2)."""


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str | None
    negative_prompt: str | None = None
    image: Path | None = None
    seed: int | None = None
    origin: str = ""  # where it was read, for messages
    video: Path | None = None  # a video file or a folder of frames


def shard_of(item_id: str, num_shards: int) -> int:
    """The shard of an item: stable across processes, machines and Python versions."""
    digest = hashlib.sha256(item_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def _check_id(item_id: str, origin: str) -> str:
    if (not item_id or item_id.startswith(".") or "/" in item_id or "\\" in item_id
            or len(item_id) > 200 or not item_id.isprintable()):
        raise BulkError(f"{origin}: bad item id {item_id!r}: ids name files, so they must be "
                        "non-empty, printable, at most 200 characters, without '/' or '\\' and "
                        "not start with '.'")
    return item_id


def _check_unique(items: list[Item], source: Path) -> list[Item]:
    seen: dict[str, str] = {}
    dupes = []
    for item in items:
        if item.id in seen:
            dupes.append(f"{item.id!r} ({seen[item.id]} and {item.origin})")
        seen[item.id] = item.origin
    if dupes:
        raise BulkError(f"{source}: item ids must be unique; duplicated: {', '.join(dupes[:10])}"
                        + (f" and {len(dupes) - 10} more" if len(dupes) > 10 else ""))
    return items


def _text(value: Any) -> str | None:
    """A prompt from a manifest: None when absent or blank."""
    if value is None:
        return None
    value = str(value)
    return value if value.strip() else None


def _manifest_rows(path: Path) -> list[tuple[str, int, dict]]:
    """(origin, line number, row) of a .jsonl or .csv manifest; a malformed one is a BulkError."""
    if not path.is_file():
        raise BulkError(f"manifest {path} does not exist")
    rows = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BulkError(f"{path} line {n}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise BulkError(f"{path} line {n}: expected a JSON object, got {line.strip()!r}")
            rows.append((f"{path.name} line {n}", n, row))
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                row = {k: v for k, v in row.items() if k is not None and v not in ("", None)}
                rows.append((f"{path.name} line {n}", n, row))
    else:
        raise BulkError(f"{path}: a manifest must be a .jsonl or .csv file")
    return rows


def _is_video(path: Path) -> bool:
    """A video file, or a folder (of frames)."""
    return path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES


def _sidecar_prompt(path: Path) -> str | None:
    """The prompt in ``<stem>.txt`` beside an image, a video file or a frame folder."""
    txt = path.parent / f"{path.stem if path.is_file() else path.name}.txt"
    return _text(txt.read_text(encoding="utf-8")) if txt.is_file() else None


def read_items(data: Path, media: str = "image", negative_prompt: str | None = None,
               pipeline: str = "the pipeline") -> list[Item]:
    """The images (``media="image"``) or videos (``"video"``) to invert: a folder of them with
    a sidecar ``<stem>.txt`` prompt each (id: the stem; a video is a file of ``VIDEO_SUFFIXES`` or
    a folder of frames, which a ``<folder>.txt`` describes), or a manifest (.jsonl / .csv) with
    ``image`` / ``video`` (relative to the manifest), ``prompt`` and optional ``id`` (default: the
    stem) and ``negative_prompt``. Data of the other kind than ``pipeline`` makes is refused."""
    other = "video" if media == "image" else "image"
    items = []
    if data.is_dir():
        entries = [p for p in sorted(data.iterdir()) if not p.name.startswith(".")]
        found = {"image": [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES],
                 "video": [p for p in entries if _is_video(p)]}
        for path in found[media]:
            items.append(Item(_check_id(path.stem if path.is_file() else path.name, str(path)),
                              _sidecar_prompt(path), negative_prompt,
                              origin=str(path), **{media: path}))
        if not items:
            kinds = (", ".join(IMAGE_SUFFIXES) if media == "image" else
                     f"folders of frames, or files {', '.join(VIDEO_SUFFIXES)}")
            holds = (f"; it holds {other}s, but {pipeline} makes {media}s" if found[other]
                     else "")
            raise BulkError(f"{data}: no {media}s ({kinds}) in this folder{holds}")
    else:
        for origin, _, row in _manifest_rows(data):
            if media not in row:
                makes = (f": {pipeline} makes {media}s, not {other}s" if other in row else "")
                raise BulkError(f"{origin}: no '{media}' field (expected id, {media}, "
                                f"prompt){makes}")
            path = data.parent / str(row[media])
            item_id = _check_id(str(row.get("id", path.stem)), origin)
            items.append(Item(item_id, _text(row.get("prompt")),
                              _text(row.get("negative_prompt", negative_prompt)),
                              origin=origin, **{media: path}))
    return _check_unique(items, data)


def read_image_items(data: Path, negative_prompt: str | None = None) -> list[Item]:
    """Images to invert (see :func:`read_items`)."""
    return read_items(data, "image", negative_prompt)


def read_prompt_items(path: Path, negative_prompt: str | None = None) -> list[Item]:
    """Prompts: a .txt file (one per line; id: the line number, 6 digits; blank lines skipped) or
    a .jsonl / .csv manifest with ``prompt`` and optional ``id`` (default: the line number),
    ``negative_prompt`` and ``seed``."""
    items = []
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise BulkError(f"prompt list {path} does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                items.append(Item(f"{n:06d}", line.strip(), negative_prompt,
                                  origin=f"{path.name} line {n}"))
    else:
        for origin, n, row in _manifest_rows(path):
            seed = row.get("seed")
            try:
                seed = None if seed is None else int(seed)
            except ValueError:
                raise BulkError(f"{origin}: seed must be an integer, got {seed!r}") from None
            items.append(Item(_check_id(str(row.get("id", f"{n:06d}")), origin),
                              _text(row.get("prompt")),
                              _text(row.get("negative_prompt", negative_prompt)), seed=seed,
                              origin=origin))
    if not items:
        raise BulkError(f"{path}: no prompts in this file")
    return _check_unique(items, path)

