"""This process's place in a job: rank, world size, device, and the torch.distributed group
when launched by torchrun / accelerate."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from .items import BulkError

TIMEOUT = datetime.timedelta(hours=24)  # ranks wait for each other only at the start and the end


class Ranks:
    """This process's place in the job: rank, world size, device; a torch.distributed group when
    launched by torchrun / accelerate with WORLD_SIZE > 1 (gloo on CPU, nccl on GPUs)."""

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":  # one GPU per rank
            device = f"cuda:{local}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BulkError(f"--device {device} but no CUDA device is available")
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            cuda = self.device.type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                    device_id=self.device if cuda else None)

    def gather(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

