"""Bulk jobs over a dataset of images or videos, in one process or many: invert, regenerate /
edit, generate.

Three commands (``belm-kernels invert-dataset | regenerate-dataset | generate-dataset``) share one
engine. They run unchanged as one process or under ``torchrun`` (or ``accelerate launch``):
with ``WORLD_SIZE > 1`` in the environment each process joins a ``torch.distributed`` group
(gloo on CPU, nccl on GPUs with one GPU per rank, ``cuda:LOCAL_RANK``).

Sharding. Every item has an id; ``shard_of(id, num_shards)`` (SHA-256 of the id, not Python's
salted ``hash``) puts it in one of a fixed number of shards. The number is chosen on the first
run into an output folder (``--shards``, default one shard per 8 items) and recorded there
(``run.json``), so a later run with any number of ranks finds the same shards. Shards that still
have work are dealt to the ranks (largest first, to the least loaded); finished ones are skipped.

Nothing lost. A shard is one safetensors file, ``shard-00003-of-00016.safetensors``, holding its
items' tensors (``<id>/<name>``) and, in its metadata, the run's config and a record per item
(what it was made from, the SHA-256 of each of its tensors and files, and of the record itself).
It is written whole: to a temporary file in the same folder, fsync'ed, then ``os.replace``'d
over the old one, so a reader sees the old shard or the new one, never a part. Image outputs
(``images/<id>.png``) are written the same way, before the shard that records them. A later run
into the folder verifies each shard file (readable, same config, and per item: inputs as in
this run, its record, tensors and files all matching their SHA-256) and skips it, or keeps what
passes and computes only the rest; an item that fails verification, or a shard file it cannot
read, is redone and reported. regenerate-dataset verifies each stored pair the same way before
using it, and refuses (fails) an item whose pair does not pass. Items are processed one at a
time, so an item's result does not depend on how many processes ran or which shard was next.

Videos. For a video pipeline (Wan, HunyuanVideo, LTX-Video, CogVideoX) an item is a video: a
folder of frames or a video file (decoded by PyAV), of the run's frame count and size (or
resized with --resize); outputs are folders of PNG frames (``videos/<id>/00000.png``), which can
be inverted again as they are. The progress bar of each rank counts frames.

Bitwise reproducibility. Results depend on the device and on the number of intra-op CPU threads,
not on the number of processes: ``--threads`` (default 1, what torchrun's OMP_NUM_THREADS=1 gives
too) is set in every process, so one process and N ranks write the same bytes.

Failures. A bad item (unreadable or corrupt image or video file, an image of another size or of a
mode with no defined 8-bit range, a video of another frame count or size, an image where a
video is expected, a missing prompt, an error in the model) is reported with its id and the
reason, and the others go on; a shard that cannot be written (disk full) is reported with its
items, its old file stays as it was and the temporary file is removed. Rank 0 prints the summary
of all ranks (items done, skipped, failed, stored results that failed verification) and writes it
to ``summary.json``; the exit code is 1 when anything failed. Problems with the job as a whole
(an unsupported pipeline, an output folder made by another model or grid, a malformed manifest)
stop it before anything is written, with exit code 2.

The parts, one module each: ``items`` (items and manifests), ``media`` (reading images and
videos, writing them), ``shards`` (the folder format: run.json, shard files, digests, atomic
writes), ``ranks`` (processes), ``jobs`` (pipelines and the three jobs), ``runner`` (the engine)
and ``cli`` (the command line).
"""

from .cli import add_commands, generate_dataset, invert_dataset, regenerate_dataset
from .items import BulkError, Item, read_image_items, read_items, read_prompt_items, shard_of
from .jobs import (
    DTYPES,
    TINY,
    GenerateJob,
    InvertJob,
    Job,
    RegenerateJob,
    bulk_pipelines,
    default_size,
    default_video_size,
    load_pipeline,
    tiny_record,
)
from .media import read_rgb, read_video
from .ranks import Ranks
from .runner import EXIT_HOOK, ITEMS_PER_SHARD, run_job
from .shards import (
    FORMAT,
    META_KEY,
    atomic_write,
    read_shard,
    record_problem,
    record_sha256,
    shard_path,
    tensor_sha256,
    write_shard,
)

__all__ = ["BulkError", "DTYPES", "EXIT_HOOK", "FORMAT", "GenerateJob", "ITEMS_PER_SHARD",
           "InvertJob", "Item", "Job", "META_KEY", "Ranks", "RegenerateJob", "TINY",
           "add_commands", "atomic_write", "bulk_pipelines", "default_size",
           "default_video_size", "generate_dataset", "invert_dataset", "load_pipeline",
           "read_image_items", "read_items", "read_prompt_items", "read_rgb", "read_shard",
           "read_video",
           "record_problem", "record_sha256", "regenerate_dataset", "run_job", "shard_of",
           "shard_path", "tensor_sha256", "tiny_record", "write_shard"]
