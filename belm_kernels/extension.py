"""The compiled backends: "cpu" (C++ kernel, csrc/lincomb_cpu.cpp) and "cuda" (CUDA C++ kernel,
csrc/lincomb_cuda.cu), both implementations of the K-term op ``belm::lincomb_ext(out, x, terms,
coef, inverse)`` whose schema belm_kernels.ops defines (its contract is ops.Backend.run's).

The first time a backend is asked whether it can run, its library is loaded into the process, at
most once per process (two loads of one library abort the interpreter), from the first of:

1. a prebuilt library inside the package (``belm_kernels/_belm_kernels_<key>.*.so``, built with
   ``BELM_KERNELS_AOT=1 pip install --no-build-isolation .``; see setup.py), when it was built
   for this torch; it needs no compiler and no ninja;
2. a just-in-time build with ``torch.utils.cpp_extension.load`` (ninja) of the sources the package
   ships (``belm_kernels/csrc``, or ``<repository>/csrc`` in a source checkout), cached in a build
   directory. A build that has to compile prints one line on stderr saying so and where its log
   is; builds are serialised per build directory by an flock that the OS releases when its
   process dies, so a killed build never blocks the next process.

When neither works the backend reports itself unavailable with the reason and its fix (one
RuntimeWarning per process where the backend applies), so "auto" falls back to the torch backend
and an explicit request raises ``BackendUnavailableError`` carrying the reason. ``origin(key)``
says where a loaded library came from (``belm-kernels backends`` prints it).

Environment variables:

    BELM_KERNELS_NO_EXTENSION=1   never build or load an extension (tests the fallback path)
    BELM_KERNELS_BUILD_DIR=DIR    build under DIR/<name>-<hash> instead of torch's extension cache
                                  (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/...)
    BELM_KERNELS_CSRC_DIR=DIR     take the sources from DIR instead of the package's
    BELM_KERNELS_BUILD_TIMEOUT=S  wait at most S seconds (default 1800) for another process that
                                  is building the same extension
    BELM_KERNELS_CPU_ISA=NAME     (read by the C++ kernel) cap its instruction set: scalar, avx2
                                  or avx512 (default: the best the CPU has)

The CUDA extension is written against torch's stable C ABI (torch/csrc/stable, torch >= 2.10) and
registers ``TORCH_LIBRARY_IMPL(belm, CUDA)``; the CPU extension uses ATen and registers
``TORCH_LIBRARY_IMPL(belm, CPU)``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch

from . import ops  # defines the schema of belm::lincomb_ext; must precede any library load
from ._extension_specs import MIN_TORCH_FOR_CUDA, PREBUILT_INFO, SPECS, ExtensionSpec

ENV_DISABLE = "BELM_KERNELS_NO_EXTENSION"
ENV_BUILD_DIR = "BELM_KERNELS_BUILD_DIR"
ENV_CSRC_DIR = "BELM_KERNELS_CSRC_DIR"
ENV_BUILD_TIMEOUT = "BELM_KERNELS_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT = 1800.0
# Below this much free space a build is not started (the CPU build needs about 1 MB in its build
# directory; the margin is for the CUDA one and the compiler's own files).
MIN_FREE_BYTES = 64 * 2**20

OP_NAME = "belm::lincomb_ext"
PACKAGE_DIR = Path(__file__).resolve().parent
AOT_FIX = ("reinstall belm-kernels built against this torch (`BELM_KERNELS_AOT=1 pip install "
           "--no-build-isolation belm-kernels`, see setup.py)")

_SPECS = SPECS
_lock = threading.RLock()
_results: dict[str, str | None] = {}  # key -> None (loaded) or the reason it is unavailable
_origins: dict[str, str] = {}  # key -> where the loaded library came from
_log_files: dict[str, Path] = {}


# --------------------------------------------------------------------------------------------
# Paths.


def csrc_dir() -> Path:
    """Directory holding the C++/CUDA sources: ``belm_kernels/csrc`` in an installed package
    (wheels and ``pip install .`` ship them there), ``<repository>/csrc`` in a source checkout or
    an editable install, or ``$BELM_KERNELS_CSRC_DIR``."""
    override = os.environ.get(ENV_CSRC_DIR)
    if override:
        return Path(override).expanduser().resolve()
    installed, checkout = PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"
    return checkout if not installed.is_dir() and checkout.is_dir() else installed


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


def origin(key: str) -> str | None:
    """Where the loaded library of extension ``key`` came from (None if it is not loaded)."""
    return _origins.get(key)


# --------------------------------------------------------------------------------------------
# Preconditions and diagnoses: each reason names the cause and the fix.


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


def _not_applicable(key: str) -> str | None:
    """Why extension ``key`` has nothing to do on this machine (no warning), else None."""
    if key == "cuda":
        if torch.version.cuda is None:
            return "torch is a CPU build (torch.version.cuda is None)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return None


def _torch_too_old(key: str) -> str | None:
    if key == "cuda" and _torch_version() < MIN_TORCH_FOR_CUDA:
        need = ".".join(map(str, MIN_TORCH_FOR_CUDA))
        return (f"the CUDA extension uses torch's stable ABI and needs torch >= {need}, found "
                f"{torch.__version__}: upgrade torch")
    return None


def _prebuilt_info() -> dict | None:
    """What setup.py recorded about the prebuilt libraries, or None if there are none."""
    path = PACKAGE_DIR / PREBUILT_INFO
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"built": {}, "skipped": {}, "error": f"{path} is unreadable ({exc})"}


def _find_prebuilt(key: str) -> tuple[Path | None, str | None]:
    """(library, None) when the package holds a prebuilt library of ``key`` that this torch can
    load; (None, why not) when the package was built ahead of time without a usable one; (None,
    None) when it was not built ahead of time at all."""
    info = _prebuilt_info()
    if info is None:
        return None, None
    if "error" in info:
        return None, f"{info['error']}; {AOT_FIX}"
    name = info.get("built", {}).get(key)
    if name is None:
        why = info.get("skipped", {}).get(key, "not built")
        return None, (f"this installation was built ahead of time without the {key} kernel "
                      f"({why}); {AOT_FIX} where it can be built")
    path = PACKAGE_DIR / name
    built_for = info.get("torch")
    if not path.is_file():
        return None, f"the prebuilt {key} kernel {path} is missing; {AOT_FIX}"
    if key == "cpu" and built_for != torch.__version__:
        # The CPU kernel uses torch's C++ API, whose ABI changes from one release to the next.
        return None, (f"the prebuilt {key} kernel {path} was built for torch {built_for}, and "
                      f"this is torch {torch.__version__}; {AOT_FIX}")
    built_cuda = str(info.get("torch_cuda")).split(".")[0]
    if key == "cuda" and built_cuda != str(torch.version.cuda).split(".")[0]:
        return None, (f"the prebuilt {key} kernel {path} was built for CUDA "
                      f"{info.get('torch_cuda')}, and this torch uses CUDA {torch.version.cuda}; "
                      f"{AOT_FIX}")
    return path, None


def _jit_precondition(key: str) -> str | None:
    """Why extension ``key`` cannot be built just in time here (cheap checks), else None."""
    spec = _SPECS[key]
    from torch.utils import cpp_extension

    if key == "cuda" and cpp_extension.CUDA_HOME is None:
        return ("the CUDA toolkit (nvcc) was not found: install it and set CUDA_HOME, or put "
                "nvcc on PATH")
    src = csrc_dir()
    missing = [s for s in spec.sources if not (src / s).is_file()]
    if missing:
        return (f"extension sources not found: {', '.join(str(src / s) for s in missing)} "
                "(reinstall belm-kernels: wheels and `pip install .` ship them in "
                f"belm_kernels/csrc; or point {ENV_CSRC_DIR} at a csrc directory)")
    if not cpp_extension.is_ninja_available():
        return ("ninja is not installed, and the extension is built with it at first use: "
                "`pip install ninja` (the `build` extra), or install a wheel built with "
                "BELM_KERNELS_AOT=1")
    return None


def _toolchain_problem(spec: ExtensionSpec) -> str | None:
    """Why the compilers a build of ``spec`` needs are missing or broken, else None."""
    from torch.utils import cpp_extension

    compilers = [("C++ compiler", os.environ.get("CXX") or "c++", "CXX")]
    if spec.key == "cuda" and cpp_extension.CUDA_HOME is not None:
        compilers.append(("CUDA compiler", str(Path(cpp_extension.CUDA_HOME, "bin", "nvcc")),
                          "CUDA_HOME"))
    for what, name, var in compilers:
        path = shutil.which(name)
        fix = f"install one (e.g. g++), or set {var} to a working one"
        if path is None:
            return f"no {what}: {name!r} was not found (PATH={os.environ.get('PATH', '')}); {fix}"
        try:
            probe = subprocess.run([path, "--version"], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"the {what} {path} does not run ({exc}); {fix}"
        if probe.returncode != 0:
            return (f"the {what} {path} does not work (`{name} --version` exited with status "
                    f"{probe.returncode}); {fix}")
    return None


def _space_problem(directory: Path) -> str | None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    if free < MIN_FREE_BYTES:
        return (f"the file system of the build directory {directory} is full ({free / 2**20:.1f} "
                f"MiB free, a build needs about {MIN_FREE_BYTES // 2**20} MiB): free some space "
                f"or point {ENV_BUILD_DIR} at another file system")
    return None


def _unwritable(directory: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return (f"the file system of the build directory {directory} is full ({exc}): free some "
                f"space or point {ENV_BUILD_DIR} at another file system")
    return (f"the build directory {directory} is not writable ({exc}): point {ENV_BUILD_DIR} "
            "(or TORCH_EXTENSIONS_DIR) at a writable directory")


# --------------------------------------------------------------------------------------------
# Just-in-time build.


def _notice(message: str) -> None:
    """One line on stderr, visible by default (the build's own output goes to its log)."""
    print(f"belm_kernels: {message}", file=sys.stderr, flush=True)


def _build_timeout() -> float:
    raw = os.environ.get(ENV_BUILD_TIMEOUT, "")
    try:
        return float(raw) if raw.strip() else DEFAULT_BUILD_TIMEOUT
    except ValueError:
        raise ValueError(f"{ENV_BUILD_TIMEOUT} must be a number of seconds, got {raw!r}") from None


@contextlib.contextmanager
def _build_lock(directory: Path, key: str):
    """Hold ``directory/belm.lock`` (an flock) for one build at a time per build directory;
    yields True when the lock is exclusive. The OS releases an flock when its process dies, so
    a killed build never blocks the next one. Raises TimeoutError after BELM_KERNELS_BUILD_TIMEOUT
    seconds of waiting for another process."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file still serialises the ninja runs
        yield False
        return

    def try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    fd = os.open(directory / "belm.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not try_lock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            timeout = _build_timeout()
            _notice(f"waiting for another process (pid {holder}) that is building the {key} "
                    f"extension in {directory} (at most {timeout:.0f} s, {ENV_BUILD_TIMEOUT})")
            deadline = time.monotonic() + timeout
            while not try_lock(fd):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process (pid {holder}) has been building the {key} extension "
                        f"in {directory} for more than {timeout:.0f} s (or is hung): let it "
                        f"finish or stop it, or set {ENV_BUILD_TIMEOUT} to wait longer")
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


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


def _needs_compile(spec: ExtensionSpec, directory: Path) -> bool:
    """Whether the cached library is missing or older than a source (ninja has the last word;
    this decides whether to announce a build and check the compilers first)."""
    from torch.utils import cpp_extension

    try:
        built = (directory / f"{spec.lib_name}{cpp_extension.LIB_EXT}").stat().st_mtime
        return any(p.stat().st_mtime > built for p in csrc_dir().iterdir() if p.is_file())
    except OSError:
        return True


def _build_and_load(spec: ExtensionSpec) -> str | None:
    """Build (ninja decides what is stale) and load the library; None when it is loaded, else
    why not."""
    directory = build_dir(spec.key)
    _log_files[spec.key] = directory / "build.log"
    try:
        with _build_lock(directory, spec.key) as exclusive:
            return _build_locked(spec, directory, exclusive)
    except TimeoutError as exc:
        return str(exc)
    except OSError as exc:  # creating the directory, its lock or its log
        return _unwritable(directory, exc)


def _build_locked(spec: ExtensionSpec, directory: Path, exclusive: bool) -> str | None:
    from torch.utils import cpp_extension

    log_path = directory / "build.log"
    sources = [str(csrc_dir() / s) for s in spec.sources]
    # Several processes may build in turn (test runners, notebooks): each appends its attempt to
    # the log (a new attempt finds ninja's earlier output above its own "no work to do"). The log
    # restarts when it grows past 2 MB.
    if log_path.is_file() and log_path.stat().st_size > 2_000_000:
        log_path.unlink()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"===== belm_kernels {spec.key} extension build, pid {os.getpid()}, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  f"torch {torch.__version__} (cuda {torch.version.cuda}), "
                  f"python {sys.version.split()[0]}\nsources: {sources}\n"
                  f"build directory: {directory}\n\n")
        # torch's build lock is a plain file that a killed build leaves behind, and torch waits
        # for it to vanish forever. While we hold our flock nobody else is building here, so one
        # that exists is stale.
        stale = directory / "lock"
        if exclusive and stale.exists():
            stale.unlink()
            log.write(f"removed {stale}, left behind by an interrupted build\n\n")

    if _needs_compile(spec, directory):
        problem = _toolchain_problem(spec) or _space_problem(directory)
        if problem is not None:
            with contextlib.suppress(OSError), open(log_path, "a", encoding="utf-8") as log:
                log.write(f"not built: {problem}\n\n")
            return f"the {spec.key} extension cannot be built: {problem}"
        took = "usually under a minute" if spec.key == "cpu" else "a few minutes"
        _notice(f"compiling the {spec.key} extension (first use only, {took}; cached in "
                f"{directory}); log: {log_path}")

    try:
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
                with contextlib.suppress(OSError):
                    log.write("\n" + traceback.format_exc() + "\n")
                    log.flush()
                raise
            with contextlib.suppress(OSError):
                log.write("\nloaded\n\n")
    except Exception as exc:  # a compiler error, a missing toolchain, a load error...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        cause = (_toolchain_problem(spec) or _space_problem(directory)
                 or "the compiler's error is in the log")
        return (f"building the {spec.key} extension failed ({type(exc).__name__}"
                f"{': ' + first if first else ''}): {cause}; build log: {log_path}")
    _origins[spec.key] = f"built just in time in {directory}, log {log_path}"
    return None


# --------------------------------------------------------------------------------------------
# Load.


def _load_library(key: str) -> str | None:
    """Load extension ``key`` from the prebuilt library or a JIT build; None when its kernel is
    registered, else the reason (cause and fix) it is not."""
    spec = _SPECS[key]
    if _has_kernel(spec.dispatch_key):
        _origins[key] = "registered before belm_kernels loaded it (e.g. torch.ops.load_library)"
        return None
    reason = _torch_too_old(key)
    if reason is not None:
        return reason
    prebuilt, not_prebuilt = _find_prebuilt(key)
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))
        except Exception as exc:  # e.g. an undefined symbol: nothing was registered
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            not_prebuilt = (f"loading the prebuilt {key} kernel {prebuilt} failed "
                            f"({type(exc).__name__}: {first}); {AOT_FIX}")
        else:
            if not _has_kernel(spec.dispatch_key):  # never load a second library after this one
                return (f"the prebuilt {key} kernel {prebuilt} loaded but registered no "
                        f"{spec.dispatch_key} kernel for {OP_NAME}; {AOT_FIX}")
            _origins[key] = (f"prebuilt library {prebuilt}, shipped in the package for torch "
                             f"{(_prebuilt_info() or {}).get('torch')}")
            return None
    reason = _jit_precondition(key)
    if reason is None:
        reason = _build_and_load(spec)
        if reason is None and not _has_kernel(spec.dispatch_key):
            reason = (f"the {key} extension loaded but registered no {spec.dispatch_key} kernel "
                      f"for {OP_NAME}; build log: {log_file(key)}")
    if reason is not None and not_prebuilt is not None:
        reason = f"{not_prebuilt}. A just-in-time build did not work either: {reason}"
    return reason


def _load(key: str) -> str | None:
    """Load extension ``key`` once per process; None when its kernel is registered, else the
    reason it is not (with one RuntimeWarning where the backend applies to this machine)."""
    if _disabled():
        return f"compiled extensions are disabled by {ENV_DISABLE}={os.environ.get(ENV_DISABLE)}"
    with _lock:
        if key in _results:
            return _results[key]
        reason = _not_applicable(key)
        if reason is None:
            reason = _load_library(key)
            if reason is not None:
                warnings.warn(f"belm_kernels: the {key!r} backend is unavailable: {reason}. "
                              "backend='auto' falls back to another backend "
                              f"({ENV_DISABLE}=1 silences this).", RuntimeWarning, stacklevel=3)
        _results[key] = reason
        return reason


def build(verbose: bool = True) -> dict[str, str | None]:
    """Load (building if needed) every extension that can be loaded on this machine now.

    Returns ``{"cpu": None | reason, "cuda": None | reason}``: None where the extension's kernel
    is registered (``origin(key)`` says from where), else why not (a CPU-only machine gives a
    reason for "cuda"). With ``verbose``, prints one line per extension (and the log's tail on a
    failed build).
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
                print(f"belm_kernels: {key} extension ready ({took:.1f} s): {origin(key)}",
                      flush=True)
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

    def run(self, out, x, terms, coef, inverse) -> None:
        torch.ops.belm.lincomb_ext.default(out, x, terms, coef, inverse)


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
