"""Build and install libra-megatron and its C++/CUDA extension ``libra_megatron._C``.

The extension compiles every ``csrc/*.cpp`` (OpenMP on). ``csrc/*.cu`` is added only when both a CUDA
toolkit and a CUDA build of torch are present (set ``LIBRA_CPU_ONLY=1`` to skip CUDA). Without the
extension every feature falls back to pure PyTorch (see ``libra_megatron/ops/extension.py``).

Install with ``pip install --no-build-isolation -e .`` (build isolation would fetch another torch).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "libra_megatron", "ops"))
from csrc_hash import csrc_hash  # noqa: E402  (a dependency-free helper shared with the runtime check)


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and bool(cuda_sources)
        and os.environ.get("LIBRA_CPU_ONLY", "0") != "1"
    )
    define = [f'-DLIBRA_CSRC_HASH="{csrc_hash(os.path.join(ROOT, "csrc"))}"']
    cxx = ["-O3", "-std=c++17", "-fopenmp"] + define
    if with_cuda:
        ext = CUDAExtension(
            "libra_megatron._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DLIBRA_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"] + define},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "libra_megatron._C",
            cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="libra-megatron",
    version="0.1.0",
    description="Libra (decoupled vision system on LLMs) training engine on megatron-core",
    packages=find_packages(include=["libra_megatron", "libra_megatron.*"]),
    package_data={"libra_megatron": ["hf_modeling/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "numpy",
        "sentencepiece",
        "pyyaml",
        "tensorboard",
        "safetensors",
        "transformers",
        "tqdm",
        "pillow",
        "psutil",
    ],
    extras_require={"test": ["pytest"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
