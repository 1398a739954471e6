"""The runner: shards of the items dealt to the ranks, finished ones verified and skipped, each
shard computed item by item and written whole, the summary of all ranks."""

from __future__ import annotations

import datetime
import hashlib
import heapq
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .items import BulkError, Item, shard_of
from .jobs import Job
from .ranks import Ranks
from .shards import (
    FORMAT,
    _describe_mismatch,
    _read_run,
    atomic_write,
    read_shard,
    record_problem,
    record_sha256,
    shard_path,
    tensor_sha256,
    write_shard,
)

ITEMS_PER_SHARD = 8  # default shard size on the first run into a folder
# Test hook: "RANK:K" makes that rank exit hard (os._exit) right after writing its K-th shard.
EXIT_HOOK = "BELM_BULK_TEST_EXIT_AFTER_SHARDS"


def _check_folder(job: Job, out: Path, num_shards: int | None) -> tuple[dict | None, int]:
    """The folder's run record (None on a first run) and the shard count; refuses a folder made
    by another command or config before anything is written."""
    if out.exists() and not out.is_dir():
        raise BulkError(f"--out {out} exists and is not a folder")
    run = _read_run(out)
    if run is None:
        if any(out.glob("shard-*.safetensors")):
            raise BulkError(f"--out {out} holds shard files but no run.json: not safe to add to; "
                            "use another output folder")
        return None, (num_shards or job.default_shards
                      or max(1, math.ceil(len(job.items) / ITEMS_PER_SHARD)))
    how = f"use another --out folder, or delete {out} to start over"
    if run["command"] != job.command:
        raise BulkError(f"--out {out} holds the output of {run['command']}, not {job.command}: "
                        f"{how}")
    if run["config"] != job.config:
        raise BulkError(f"--out {out} holds results made with another config ("
                        f"{_describe_mismatch(run['config'], job.config)}): refusing to mix "
                        f"them; rerun with the same options to resume, or {how}")
    if num_shards not in (None, run["num_shards"]):
        raise BulkError(f"--out {out} is split into {run['num_shards']} shards (fixed per folder),"
                        f" not --shards {num_shards}: omit --shards to resume, or {how}")
    return run, run["num_shards"]


def _load_shard(job: Job, out: Path, shard: int):
    """(tensors, trusted records, problems) of a shard file: what it holds, the records of the
    items that pass their checks (``record_problem``), and a problem (shard, id, text) per item
    that does not -- or one for the whole file if it is unreadable (then nothing is trusted). A
    shard of another config than the job's is a BulkError."""
    path = shard_path(out, shard, job.num_shards)
    if not path.exists():
        return {}, {}, []
    try:
        tensors, meta = read_shard(path)
    except Exception as exc:
        return {}, {}, [{"shard": shard, "id": None, "problem": f"shard file {path.name} is "
                         f"unreadable ({exc}): its items are computed again"}]
    if meta.get("config") != job.config:
        raise BulkError(f"{path} was made with another config than its folder's run.json "
                        f"({_describe_mismatch(meta.get('config') or {}, job.config)}); "
                        "refusing to overwrite it")
    trusted, problems = {}, []
    for rec in meta.get("items", []):
        problem = record_problem(out, rec, tensors)
        if problem is None:
            trusted[rec["id"]] = rec
        else:
            problems.append({"shard": shard, "id": rec.get("id"), "problem": f"shard file "
                             f"{path.name}, item {rec.get('id')!r}: {problem}: computed again"})
    return tensors, trusted, problems


def _shard_status(job, out, shard, items):
    """(shard, items to compute, items reusable, refusal, problems) of a shard of this rank's
    check: the stored items are verified here, before anything is counted as done."""
    try:
        _, trusted, problems = _load_shard(job, out, shard)
    except BulkError as exc:
        return shard, None, None, str(exc), []
    reuse = sum(1 for it in items
                if it.id in trusted and trusted[it.id]["fingerprint"] == job.fingerprint(it))
    return shard, len(items) - reuse, reuse, None, problems


def _deal(todo: list[tuple[int, int]], world: int) -> list[list[int]]:
    """Shards with work -> ranks: largest first, each to the least loaded rank (deterministic)."""
    loads = [(0, r) for r in range(world)]
    assigned: list[list[int]] = [[] for _ in range(world)]
    for shard, n in sorted(todo, key=lambda sn: (-sn[1], sn[0])):
        load, r = heapq.heappop(loads)
        assigned[r].append(shard)
        heapq.heappush(loads, (load + n, r))
    return [sorted(a) for a in assigned]


def _exit_hook(rank: int) -> int | None:
    spec = os.environ.get(EXIT_HOOK)
    if not spec:
        return None
    who, k = spec.split(":")
    return int(k) if int(who) == rank else None


def _prepare_folder(job: Job, out: Path, record: bool) -> None:
    """Rank 0, before any shard is written: create the folder, remove temporary files left by a
    killed process, and on a first run record the config (run.json)."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "images"):
        for stale in folder.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
    if record:
        import diffusers

        atomic_write(out / "run.json", json.dumps(
            {"format": FORMAT, "command": job.command, "num_shards": job.num_shards,
             "config": job.config,
             "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}},
            indent=1, sort_keys=True).encode("utf-8"))


def _summarise(job: Job, out: Path, ranks: Ranks, mine: dict, skipped: int,
               untrusted: list[dict]) -> int:
    """Gather every rank's counts; rank 0 prints them and writes summary.json. The exit code."""
    parts = ranks.gather(mine)
    failures = [*job.source_failures, *(f for p in parts for f in p["failures"])]
    done = sum(p["done"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    summary = {
        "command": job.command, "items": len(job.items), "done": done, "skipped": skipped,
        "failed": len(failures), "failures": failures, "untrusted": untrusted,
        "num_shards": job.num_shards,
        "shards_written": sum(p["written"] for p in parts), "world_size": ranks.world,
        "threads": torch.get_num_threads(), "device": str(ranks.device),
        "seconds": round(seconds, 3),
        "check_seconds": round(max(p["check_seconds"] for p in parts), 3),
        "items_per_second": round(done / seconds, 4) if done and seconds > 0 else None}
    if ranks.rank == 0:
        atomic_write(out / "summary.json", json.dumps(summary, indent=1).encode("utf-8"))
        rate = f", {summary['items_per_second']} items/s" if summary["items_per_second"] else ""
        bad = (f", {len(untrusted)} stored result(s) failing verification computed again"
               if untrusted else "")
        print(f"{job.command}: {len(job.items)} items: {done} done, {skipped} skipped (already "
              f"in {out}, verified), {len(failures)} failed{bad}; {summary['shards_written']} of "
              f"{job.num_shards} shards written by {ranks.world} process(es) in {seconds:.1f} s"
              f"{rate}")
        for f in failures:
            what = f"item {f['id']!r}" if f["id"] is not None else "shard"
            print(f"  FAILED {what} (shard {f['shard']}): {f['error']}")
        print(f"summary: {out / 'summary.json'}")
    return 1 if failures else 0


def run_job(job: Job, out: Path, ranks: Ranks, num_shards: int | None = None,
            progress: bool = True) -> int:
    """Run ``job`` into ``out`` on this rank; returns the exit code (the same on every rank)."""
    from tqdm.auto import tqdm

    run, job.num_shards = _check_folder(job, out, num_shards)
    by_shard: dict[int, list[Item]] = {}
    for item in job.items:
        by_shard.setdefault(shard_of(item.id, job.num_shards), []).append(item)
    if ranks.rank == 0:
        _prepare_folder(job, out, record=run is None)

    # Which shards have work: each rank checks (and verifies) a slice, then all see all (and
    # wait for rank 0).
    checking = time.perf_counter()
    mine = [s for s in sorted(by_shard) if s % ranks.world == ranks.rank]
    status = [_shard_status(job, out, s, by_shard[s]) for s in mine]
    check_seconds = time.perf_counter() - checking
    status = sorted(st for part in ranks.gather(status) for st in part)
    foreign = [refusal for *_, refusal, _ in status if refusal]
    if foreign:
        raise BulkError(foreign[0] + (f" (and {len(foreign) - 1} more shards)"
                                      if len(foreign) > 1 else ""))
    untrusted = [p for *_, problems in status for p in problems]
    if ranks.rank == 0:
        for p in untrusted:
            print(f"NOT TRUSTED: {p['problem']}", file=sys.stderr, flush=True)
    skipped = sum(reuse for _, _, reuse, _, _ in status)
    todo = [(s, n) for s, n, *_ in status if n]
    my_shards = _deal(todo, ranks.world)[ranks.rank]
    n_mine = sum(n for s, n in todo if s in my_shards)

    done, failures, written = 0, [], 0
    exit_after = _exit_hook(ranks.rank)
    start = time.perf_counter()
    # one bar per rank, counting items, or the frames of the videos
    bar = tqdm(total=n_mine * job.per_item, position=ranks.rank,
               desc=f"{job.command} [rank {ranks.rank}]", unit=job.unit, disable=not progress,
               dynamic_ncols=True)

    def report(shard, item_id, error):
        failures.append({"id": item_id, "shard": shard, "error": error})
        bar.write(f"[rank {ranks.rank}] FAILED item {item_id!r} (shard {shard}): {error}",
                  file=sys.stderr)

    for shard in my_shards:
        path = shard_path(out, shard, job.num_shards)
        tensors, records, _ = _load_shard(job, out, shard)  # its problems were reported above
        new = []
        for item in by_shard[shard]:
            fingerprint = job.fingerprint(item)
            rec = records.get(item.id)
            if rec is not None and rec["fingerprint"] == fingerprint:
                continue
            try:
                made, files = job.process(item)
                for rel, data in files.items():
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(out / rel, data)
            except Exception as exc:  # reported; the other items go on
                report(shard, item.id, str(exc) if isinstance(exc, ValueError)  # ours: readable
                       else f"{type(exc).__name__}: {exc}")
                bar.update(job.per_item)
                continue
            for name in [k for k in tensors if k.startswith(f"{item.id}/")]:
                del tensors[name]  # an outdated result of this id
            tensors.update({f"{item.id}/{name}": t for name, t in made.items()})
            rec = {"id": item.id, "fingerprint": fingerprint, "origin": item.origin,
                   "tensors": {name: tensor_sha256(t) for name, t in sorted(made.items())},
                   "files": {rel: hashlib.sha256(data).hexdigest()
                             for rel, data in sorted(files.items())}}
            records[item.id] = {**rec, "sha256": record_sha256(rec)}
            new.append(item.id)
            bar.update(job.per_item)
        if not new:  # (an unreadable old file stays until there is something to replace it)
            continue
        meta = {"config": job.config, "shard": shard, "num_shards": job.num_shards,
                "items": [records[i] for i in sorted(records)]}
        tensors = {k: v for k, v in tensors.items() if k.rsplit("/", 1)[0] in records}
        try:
            write_shard(path, tensors, meta)
        except OSError as exc:
            for item_id in new:
                report(shard, item_id, f"shard file {path} could not be written ({exc}); the "
                                       "item is not saved, its shard file is as it was")
            continue
        done += len(new)
        written += 1
        if exit_after is not None and written >= exit_after:
            bar.close()
            print(f"[rank {ranks.rank}] {EXIT_HOOK}: exiting after {written} shards",
                  file=sys.stderr, flush=True)
            os._exit(17)
    bar.close()
    return _summarise(job, out, ranks, {"done": done, "failures": failures, "written": written,
                                        "seconds": time.perf_counter() - start,
                                        "check_seconds": check_seconds}, skipped, untrusted)

