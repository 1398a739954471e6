"""The output folder's format: ``run.json`` (the config), shard files (safetensors with one
metadata entry) whose item records carry the SHA-256 of every tensor, file and of the record
itself, and atomic writes (temporary file, fsync, ``os.replace``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .items import BulkError

# 3: a SHA-256 of every stored tensor, file and item record; 2: the full grid record (flow sigmas
# and mu), not timesteps. A folder of another format is refused.
FORMAT = "belm-kernels bulk 3"
META_KEY = "belm_kernels.bulk"  # the one metadata entry of a shard file (one key: stable bytes)


def _write_bytes(f, data: bytes) -> None:
    """The one place output bytes hit the disk (tests simulate a full disk here)."""
    f.write(data)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: temporary file in the same folder, fsync,
    ``os.replace``, fsync of the folder. On any error the temporary file is removed and ``path``
    keeps its old content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_path(out: Path, shard: int, num_shards: int) -> Path:
    return out / f"shard-{shard:05d}-of-{num_shards:05d}.safetensors"


def read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a shard file; raises if it is unreadable or not a shard."""
    from safetensors import safe_open
    from safetensors.torch import load

    data = path.read_bytes()
    tensors = load(data)
    with safe_open(path, "pt") as f:
        meta = (f.metadata() or {}).get(META_KEY)
    if meta is None:
        raise ValueError(f"no {META_KEY!r} metadata: not a shard of this tool")
    return tensors, json.loads(meta)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write(path, data)


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor as a shard stores it: dtype, shape and bytes (C order, on the CPU)."""
    t = t.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}\n".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def record_sha256(rec: dict) -> str:
    """SHA-256 of an item record (its JSON, keys sorted) without its own ``sha256`` entry: covers
    what the item was made from and the digests of its tensors and files."""
    body = {k: v for k, v in rec.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def record_problem(out: Path, rec: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why a stored item cannot be trusted -- its record, a tensor (in ``tensors``, by
    ``<id>/<name>``) or a file (relative to ``out``) missing or not matching its SHA-256 --, or
    None. The one check of everything a shard stores, wherever a stored item is used."""
    if rec.get("sha256") != record_sha256(rec):
        return "its record does not match its SHA-256"
    for name, sha in rec["tensors"].items():
        t = tensors.get(f"{rec['id']}/{name}")
        if t is None:
            return f"tensor {name!r} is missing"
        if tensor_sha256(t) != sha:
            return f"tensor {name!r} does not match its SHA-256 (corrupted)"
    for rel, sha in rec["files"].items():
        try:
            data = (out / rel).read_bytes()
        except OSError as exc:
            return f"file {rel} is unreadable ({exc.strerror or exc})"
        if hashlib.sha256(data).hexdigest() != sha:
            return f"file {rel} does not match its SHA-256 (corrupted)"
    return None


def _normalise(obj: Any) -> Any:
    """JSON round trip (tuples -> lists, keys sorted): what a stored config reads back as."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _read_run(out: Path) -> dict | None:
    path = out / "run.json"
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BulkError(f"{path} is unreadable ({exc}); it records the folder's config: restore "
                        "it, or use another output folder") from None
    if run.get("format") != FORMAT:
        raise BulkError(f"{path} is not a run record of this version of the tool ({FORMAT}; it "
                        f"has {run.get('format')!r}): use another folder")
    return run


def _stored_items(out: Path, num_shards: int) -> tuple[dict[str, tuple[Path, dict]], list[dict]]:
    """Every item record of a folder's shards with its shard's path (the records are verified
    where their tensors are read), and a failure per shard file that cannot be read (its items
    cannot be used)."""
    from safetensors import safe_open

    stored, failures = {}, []
    for shard in range(num_shards):
        path = shard_path(out, shard, num_shards)
        if not path.exists():
            continue
        try:
            with safe_open(path, "pt") as f:
                meta = json.loads(f.metadata()[META_KEY])
        except Exception as exc:
            failures.append({"id": None, "shard": shard,
                             "error": f"shard file {path} is unreadable ({exc}); its items are "
                                      "missing: run invert-dataset into that folder again"})
            continue
        for rec in meta["items"]:
            stored[rec["id"]] = (path, rec)
    return stored, failures


def _describe_mismatch(old: dict, new: dict, prefix: str = "") -> str:
    """The keys whose values differ (nested ones as ``grid.mu``), with both values."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(
        _describe_mismatch(old[k], new[k], f"{prefix}{k}.")
        if isinstance(old.get(k), dict) and isinstance(new.get(k), dict) else
        f"{prefix}{k}: {json.dumps(old.get(k))[:200]} there, {json.dumps(new.get(k))[:200]} "
        "in this run" for k in keys)
