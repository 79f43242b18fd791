"""Every csrc/*.cu compiles with nvcc (no GPU needed), so CUDA code cannot rot between GPU checks."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[os.path.basename(s) for s in CUDA_SOURCES])
def test_cuda_source_compiles(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}"]
    cmd = ["nvcc", "-std=c++17", "-O2", "-c", source, "-o", str(tmp_path / "out.o"),
           "-gencode=arch=compute_90,code=sm_90", *includes]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed for {source}:\n{result.stderr[-4000:]}"
