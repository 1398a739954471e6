"""The compiled backends: "cpu" (C++ kernel, csrc/lincomb3_cpu.cpp) and "cuda" (CUDA C++ kernel,
csrc/lincomb3_cuda.cu), both implementations of the op ``belm::lincomb3_ext`` whose schema
belm_kernels.ops defines.

Each extension is built just in time with ``torch.utils.cpp_extension.load`` (ninja) the first time
a backend is asked whether it can run, then loaded into the process, at most once per process (two
loads of one library abort the interpreter). A failed build gives one warning naming its log file;
the backend then reports itself unavailable with that reason, so "auto" falls back to the torch
backend and an explicit request raises ``BackendUnavailableError`` carrying the reason.

Environment variables:

    BELM_KERNELS_NO_EXTENSION=1   never build or load an extension (tests the fallback path)
    BELM_KERNELS_BUILD_DIR=DIR    build under DIR/<name>-<hash> instead of torch's extension cache
                                  (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/...)
    BELM_KERNELS_CSRC_DIR=DIR     take the sources from DIR instead of <repository>/csrc
    BELM_KERNELS_CPU_ISA=NAME     (read by the C++ kernel) cap its instruction set: scalar, avx2
                                  or avx512 (default: the best the CPU has)

The CUDA extension is written against torch's stable C ABI (torch/csrc/stable, torch >= 2.10) and
registers ``TORCH_LIBRARY_IMPL(belm, CUDA)``; the CPU extension uses ATen and registers
``TORCH_LIBRARY_IMPL(belm, CPU)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch

from . import ops  # defines the schema of belm::lincomb3_ext; must precede any library load

ENV_DISABLE = "BELM_KERNELS_NO_EXTENSION"
ENV_BUILD_DIR = "BELM_KERNELS_BUILD_DIR"
ENV_CSRC_DIR = "BELM_KERNELS_CSRC_DIR"

OP_NAME = "belm::lincomb3_ext"
# The CUDA source targets the stable ABI of this torch version (see TORCH_TARGET_VERSION there).
MIN_TORCH_FOR_CUDA = (2, 10)


@dataclasses.dataclass(frozen=True)
class _Spec:
    key: str  # "cpu" | "cuda"
    lib_name: str
    sources: tuple[str, ...]
    dispatch_key: str
    extra_cflags: tuple[str, ...] = ()
    extra_cuda_cflags: tuple[str, ...] = ()
    extra_ldflags: tuple[str, ...] = ()


_SPECS = {
    "cpu": _Spec(
        key="cpu",
        lib_name="belm_kernels_cpu",
        sources=("lincomb3_cpu.cpp",),
        dispatch_key="CPU",
        # -fopenmp: at::parallel_for is inline and parallel only when compiled with OpenMP; the
        # library then needs libgomp.so.1, the copy torch has already loaded.
        # -ffp-contract=off: exactly the multiplies and fmas written, on every path.
        extra_cflags=("-O3", "-fopenmp", "-ffp-contract=off"),
        extra_ldflags=("-fopenmp",),
    ),
    "cuda": _Spec(
        key="cuda",
        lib_name="belm_kernels_cuda",
        sources=("lincomb3_cuda.cu",),
        dispatch_key="CUDA",
        extra_cuda_cflags=("-O3", "-DUSE_CUDA", "-lineinfo"),
    ),
}

_lock = threading.RLock()
_results: dict[str, str | None] = {}  # key -> None (loaded) or the reason it is unavailable
_log_files: dict[str, Path] = {}


# --------------------------------------------------------------------------------------------
# Paths.


def csrc_dir() -> Path:
    """Directory holding the C++/CUDA sources (``<repository>/csrc`` unless overridden)."""
    override = os.environ.get(ENV_CSRC_DIR)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "csrc"


def _build_root() -> Path:
    override = os.environ.get(ENV_BUILD_DIR)
    if override:
        return Path(override).expanduser().resolve()
    from torch.utils import cpp_extension

    try:  # torch's own choice: TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/py311_cu130
        return Path(cpp_extension._get_build_directory("", verbose=False))
    except Exception:  # private helper; fall back to the public root
        return Path(cpp_extension.get_default_build_root())


def build_dir(key: str) -> Path:
    """Build directory of extension ``key`` ("cpu" or "cuda").

    A short hash of the source directory and the torch/python versions keeps two checkouts (or
    two environments) on one machine from rebuilding each other's libraries.
    """
    spec = _SPECS[key]
    ident = f"{csrc_dir()}|{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}"
    tag = hashlib.sha1(ident.encode()).hexdigest()[:8]
    return _build_root() / f"{spec.lib_name}-{tag}"


def log_file(key: str) -> Path:
    """Where the build output of extension ``key`` goes."""
    return build_dir(key) / "build.log"


# --------------------------------------------------------------------------------------------
# Build and load.


def _disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no")


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, dispatch_key))
    except Exception:
        return False


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return (0, 0)


def _precondition(key: str) -> str | None:
    """Why extension ``key`` cannot be built on this machine now (cheap checks), else None."""
    spec = _SPECS[key]
    if key == "cuda":
        if torch.version.cuda is None:
            return "torch is a CPU build (torch.version.cuda is None)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if _torch_version() < MIN_TORCH_FOR_CUDA:
            need = ".".join(map(str, MIN_TORCH_FOR_CUDA))
            return f"the CUDA extension uses torch's stable ABI and needs torch >= {need}, " \
                   f"found {torch.__version__}"
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None:
            return "the CUDA toolkit (nvcc) was not found; set CUDA_HOME"
    src = csrc_dir()
    missing = [s for s in spec.sources if not (src / s).is_file()]
    if missing:
        return (f"extension sources not found: {', '.join(str(src / s) for s in missing)} "
                "(install belm_kernels from its repository, e.g. `pip install -e .`, "
                f"or point {ENV_CSRC_DIR} at the csrc directory)")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (`pip install ninja`), so the extension cannot be built"
    return None


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout/stderr (file descriptors 1 and 2, so the compiler's output
    too) to ``path`` while the block runs. Yields False when the descriptors cannot be moved."""
    with open(path, "a", encoding="utf-8", errors="replace") as log:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = (os.dup(1), os.dup(2))
        except (OSError, ValueError, AttributeError):
            yield log, False
            return
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield log, True
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _interprocess_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file still serialises the ninja runs
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build_and_load(spec: _Spec) -> None:
    """Build (ninja decides what is stale) and load the library; raises on failure."""
    directory = build_dir(spec.key)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "build.log"
    _log_files[spec.key] = log_path
    sources = [str(csrc_dir() / s) for s in spec.sources]
    # Several processes may build at once (test runners, notebooks): one at a time per build
    # directory, each appending its attempt to the log (a new attempt finds ninja's earlier
    # output above its own "no work to do"). The log restarts when it grows past 2 MB.
    with _interprocess_lock(directory / "belm.lock"):
        if log_path.is_file() and log_path.stat().st_size > 2_000_000:
            log_path.unlink()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(
                f"===== belm_kernels {spec.key} extension build, pid {os.getpid()}, "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                f"torch {torch.__version__} (cuda {torch.version.cuda}), "
                f"python {sys.version.split()[0]}\nsources: {sources}\n"
                f"build directory: {directory}\n\n")
        _build_locked(spec, sources, directory, log_path)


def _build_locked(spec: _Spec, sources: list[str], directory: Path, log_path: Path) -> None:
    from torch.utils import cpp_extension

    with _output_to(log_path) as (log, redirected):
        try:
            cpp_extension.load(
                name=spec.lib_name,
                sources=sources,
                extra_cflags=list(spec.extra_cflags),
                extra_cuda_cflags=list(spec.extra_cuda_cflags),
                extra_ldflags=list(spec.extra_ldflags),
                build_directory=str(directory),
                verbose=redirected,  # the compiler's output lands in the log either way
                is_python_module=False,
                is_standalone=False,
            )
        except BaseException:
            log.write("\n" + traceback.format_exc() + "\n")
            log.flush()
            raise
        log.write("\nloaded\n\n")


def _load(key: str) -> str | None:
    """Build and load extension ``key`` once per process; None when its kernel is registered,
    else the reason it is not."""
    if _disabled():
        return f"compiled extensions are disabled by {ENV_DISABLE}={os.environ.get(ENV_DISABLE)}"
    with _lock:
        if key in _results:
            return _results[key]
        spec = _SPECS[key]
        if _has_kernel(spec.dispatch_key):  # loaded by other means (e.g. torch.ops.load_library)
            _results[key] = None
            return None
        reason = _precondition(key)
        if reason is None:
            try:
                _build_and_load(spec)
            except Exception as exc:  # a compiler error, a missing toolchain, a load error...
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                log = _log_files.get(key, log_file(key))
                reason = (f"building the {key} extension failed ({type(exc).__name__}"
                          f"{': ' + first[:200] if first else ''}); build log: {log}")
                warnings.warn(f"belm_kernels: {reason}. The {key!r} backend is unavailable; "
                              "backend='auto' falls back to another backend.",
                              RuntimeWarning, stacklevel=3)
            else:
                if not _has_kernel(spec.dispatch_key):
                    reason = (f"the {key} extension loaded but registered no {spec.dispatch_key} "
                              f"kernel for {OP_NAME}; build log: {log_file(key)}")
        _results[key] = reason
        return reason


def build(verbose: bool = True) -> dict[str, str | None]:
    """Build and load every extension that can be built on this machine now.

    Returns ``{"cpu": None | reason, "cuda": None | reason}``: None where the extension is built
    and its kernel registered, else why not (a CPU-only machine gives a reason for "cuda").
    With ``verbose``, prints one line per extension (and the log's tail on a failure).
    """
    results: dict[str, str | None] = {}
    for key in _SPECS:
        started = time.perf_counter()
        if verbose:
            print(f"belm_kernels: {key} extension ...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the reason is returned instead
            reason = _load(key)
        results[key] = reason
        if verbose:
            took = time.perf_counter() - started
            if reason is None:
                print(f"belm_kernels: {key} extension ready ({took:.1f} s; build directory "
                      f"{build_dir(key)})", flush=True)
            else:
                print(f"belm_kernels: {key} extension unavailable: {reason}", flush=True)
                log = _log_files.get(key)
                if log is not None and log.is_file():
                    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
                    print("\n".join("    " + line for line in tail), flush=True)
    return results


# --------------------------------------------------------------------------------------------
# Backend objects (the protocol of belm_kernels.ops.Backend).


class _ExtensionBackend:
    def __init__(self, name: str, device_type: str, description: str):
        self.name = name
        self.dtypes = ops.FLOAT_DTYPES
        self._device_type = device_type
        self._description = description

    def __repr__(self) -> str:
        return f"<belm_kernels backend {self.name!r}: {self._description}>"

    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type != self._device_type:
            return f"the {self._description} runs on {self._device_type} tensors only, " \
                   f"not {device.type}"
        return _load(self.name)

    def run(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef: torch.Tensor,
            inverse: bool) -> None:
        torch.ops.belm.lincomb3_ext(x, y, z, coef, inverse)


_BACKENDS = {
    "cpu": _ExtensionBackend("cpu", "cpu", "C++ CPU extension"),
    "cuda": _ExtensionBackend("cuda", "cuda", "CUDA C++ extension"),
}


def get_backend(name: str) -> _ExtensionBackend:
    """The backend object for "cpu" or "cuda" (what belm_kernels.ops.get_backend returns)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"belm_kernels.extension provides the backends {tuple(_BACKENDS)}, "
                         f"not {name!r}") from None
