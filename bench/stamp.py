"""What every benchmark result is stamped with: device, driver, versions, date, machine load."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        v = torch._C._cuda_getDriverVersion()
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10}"
    except Exception:
        return "unknown"


def stamp(device: torch.device, **extra: str) -> dict[str, str]:
    """Device, versions (torch, triton, python and ``extra``), date, cores and load."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        **extra,
        "python": platform.python_version(),
        "host": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_model(),
        "cpu_cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }
    if hasattr(os, "getloadavg"):  # a busy shared machine skews CPU timings: say so
        info["load_average_at_start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["gpu"] = info["device"]
        info["driver"] = gpu_driver()
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = f"{info['cpu']} ({info['cpu_cores']} cores)"
    return info


def device_slug(device: torch.device, info: dict[str, str]) -> str:
    """File-name slug of the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2c``."""
    name = info["device"] if device.type == "cuda" else f"cpu-{info['cpu']}-{info['cpu_cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
