"""Build script. Everything is declared in pyproject.toml except the optional prebuilt kernels.

By default the wheel is pure Python: the C++/CUDA sources ship inside it (belm_kernels/csrc) and
the extension is compiled just in time at first use (needs a compiler and ninja then). This
build imports nothing beyond setuptools, so pip's isolated build environment stays light.

Ahead of time, the way other torch extensions are built: with torch already installed,

    BELM_KERNELS_AOT=1 pip install --no-build-isolation .      (or pip wheel --no-build-isolation .)

compiles the kernels against that torch into the package, so the installed package needs no
compiler and no ninja at run time. BELM_KERNELS_AOT=1 builds the CPU kernel, and the CUDA kernel
where torch has CUDA and a CUDA toolkit is found (CUDA_HOME or nvcc on PATH; TORCH_CUDA_ARCH_LIST
picks the GPU architectures); BELM_KERNELS_AOT=cpu,cuda (or cpu, or cuda) names the kernels and
fails when one of them cannot be built. A prebuilt CPU kernel only loads into the torch version it
was built with; with another torch the loader falls back to a just-in-time build.
"""

import json
import os
import runpy
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
AOT_ENV = "BELM_KERNELS_AOT"
SPECS = runpy.run_path(str(HERE / "belm_kernels" / "_extension_specs.py"))


def requested_kernels() -> tuple[list[str], bool]:
    """(kernels to build ahead of time, whether each must be built) from BELM_KERNELS_AOT."""
    value = os.environ.get(AOT_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return [], False
    if value in ("1", "true", "yes", "all"):
        return list(SPECS["SPECS"]), False
    keys = [k.strip() for k in value.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SPECS["SPECS"]]
    if unknown:
        sys.exit(f"error: {AOT_ENV}={value!r}: expected 1, or a comma-separated list of "
                 f"{', '.join(SPECS['SPECS'])}")
    return keys, True


def cuda_skip_reason(torch, cpp_extension) -> str | None:
    """Why the CUDA kernel cannot be built here, else None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    have = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    need = SPECS["MIN_TORCH_FOR_CUDA"]
    if have < need:
        return (f"the CUDA kernel uses torch's stable ABI, which needs torch >= "
                f"{'.'.join(map(str, need))}, found {torch.__version__}")
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    return None


def aot_setup_kwargs(keys: list[str], strict: bool) -> dict:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        sys.exit(f"error: {AOT_ENV} compiles the kernels against the installed torch, but torch "
                 f"cannot be imported in this build environment ({exc}). Install torch first and "
                 f"build without build isolation: `pip install torch && {AOT_ENV}=1 pip install "
                 f"--no-build-isolation .` (or `pip wheel --no-build-isolation .`)")

    extensions, skipped = [], {}
    for key in keys:
        spec = SPECS["SPECS"][key]
        module = SPECS["prebuilt_module"](key)
        sources = [f"csrc/{s}" for s in spec.sources]
        if key == "cuda":
            reason = cuda_skip_reason(torch, cpp_extension)
            if reason is not None:
                if strict:
                    sys.exit(f"error: {AOT_ENV} asks for the cuda kernel, which cannot be built "
                             f"here: {reason}")
                print(f"belm_kernels: not building the cuda kernel ahead of time: {reason}")
                skipped[key] = reason
                continue
            extensions.append(cpp_extension.CUDAExtension(
                module, sources, extra_compile_args={"cxx": ["-O3"],
                                                     "nvcc": list(spec.extra_cuda_cflags)},
                extra_link_args=list(spec.extra_ldflags)))
        else:
            extensions.append(cpp_extension.CppExtension(
                # -g0: setuptools compiles with Python's CFLAGS, whose -g makes the library 17x
                # larger than the JIT build's.
                module, sources, extra_compile_args={"cxx": [*spec.extra_cflags, "-g0"]},
                extra_link_args=list(spec.extra_ldflags)))
        print(f"belm_kernels: building the {key} kernel ahead of time for torch "
              f"{torch.__version__}")
    for key in SPECS["SPECS"]:
        if key not in keys:
            skipped[key] = f"not requested ({AOT_ENV}={os.environ[AOT_ENV]})"

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's build_ext, plus a note of what was built for which torch (read by the loader)."""

        def _info_path(self) -> Path:
            return Path(self.get_ext_fullpath(self.extensions[0].name)).with_name(
                SPECS["PREBUILT_INFO"])

        def run(self):
            super().run()
            built = {key: Path(self.get_ext_fullpath(SPECS["prebuilt_module"](key))).name
                     for key in keys if key not in skipped}
            info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "built": built, "skipped": skipped}
            self._info_path().write_text(json.dumps(info, indent=1) + "\n")

        def get_outputs(self):
            return super().get_outputs() + [str(self._info_path())]

    return {"ext_modules": extensions, "cmdclass": {"build_ext": BuildExtension}}


keys, strict = requested_kernels()
setup(**(aot_setup_kwargs(keys, strict) if keys else {}))
