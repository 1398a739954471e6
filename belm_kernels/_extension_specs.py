"""What each compiled extension is made of: its sources (in csrc/) and compiler flags.

Shared by the loader's just-in-time build (belm_kernels/extension.py) and the ahead-of-time build
of setup.py (BELM_KERNELS_AOT=1). It imports nothing, so setup.py can read it without torch and
without importing the package.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ExtensionSpec:
    key: str  # "cpu" | "cuda": the backend it provides
    lib_name: str  # the JIT library's name; the prebuilt one is the module belm_kernels._<lib_name>
    sources: tuple  # file names in csrc/
    dispatch_key: str
    extra_cflags: tuple = ()
    extra_cuda_cflags: tuple = ()
    extra_ldflags: tuple = ()


SPECS = {
    "cpu": ExtensionSpec(
        key="cpu",
        lib_name="belm_kernels_cpu",
        sources=("lincomb_cpu.cpp",),
        dispatch_key="CPU",
        # -fopenmp: at::parallel_for is inline and parallel only when compiled with OpenMP; the
        # library then needs libgomp.so.1, the copy torch has already loaded.
        # -ffp-contract=off: exactly the multiplies and fmas written, on every path.
        extra_cflags=("-O3", "-fopenmp", "-ffp-contract=off"),
        extra_ldflags=("-fopenmp",),
    ),
    "cuda": ExtensionSpec(
        key="cuda",
        lib_name="belm_kernels_cuda",
        sources=("lincomb_cuda.cu",),
        dispatch_key="CUDA",
        extra_cuda_cflags=("-O3", "-DUSE_CUDA", "-lineinfo"),
    ),
}

# The CUDA source targets the stable ABI of this torch version (see TORCH_TARGET_VERSION there).
MIN_TORCH_FOR_CUDA = (2, 10)
# Written next to the prebuilt libraries by setup.py: which were built, for which torch, and why
# any was skipped.
PREBUILT_INFO = "_prebuilt.json"


def prebuilt_module(key: str) -> str:
    """Module name of the prebuilt library of extension ``key`` (a file in the package)."""
    return f"belm_kernels._{SPECS[key].lib_name}"
