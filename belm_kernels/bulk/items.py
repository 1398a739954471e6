"""Items and where they come from: ids, shards of ids, manifests, folders of images and prompt
lists. Problems with the job as a whole (a malformed manifest, duplicated ids) raise
:class:`BulkError`, before anything is written."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


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


def read_image_items(data: Path, negative_prompt: str | None = None) -> list[Item]:
    """Images to invert: a folder of images with a sidecar ``<stem>.txt`` prompt each (id: the
    stem), or a manifest (.jsonl / .csv) with ``image`` (relative to the manifest), ``prompt`` and
    optional ``id`` (default: the image's stem) and ``negative_prompt``."""
    items = []
    if data.is_dir():
        for path in sorted(data.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                txt = path.with_suffix(".txt")
                prompt = _text(txt.read_text(encoding="utf-8")) if txt.is_file() else None
                items.append(Item(_check_id(path.stem, str(path)), prompt, negative_prompt, path,
                                  origin=str(path)))
        if not items:
            raise BulkError(f"{data}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    else:
        for origin, _, row in _manifest_rows(data):
            if "image" not in row:
                raise BulkError(f"{origin}: no 'image' field (expected id, image, prompt)")
            image = data.parent / str(row["image"])
            item_id = _check_id(str(row.get("id", image.stem)), origin)
            items.append(Item(item_id, _text(row.get("prompt")),
                              _text(row.get("negative_prompt", negative_prompt)), image,
                              origin=origin))
    return _check_unique(items, data)


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

