"""Content hash of the C++/CUDA sources, baked into the extension at build time to detect stale builds.

Dependency-free on purpose: ``setup.py`` imports this file directly, before torch or the package exist.
"""
import hashlib
import os


def csrc_hash(csrc_dir: str) -> str:
    """Return a short sha256 over the names and contents of every source file in ``csrc_dir``."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(csrc_dir)):
        if name.endswith((".cpp", ".cu", ".h", ".cuh")):
            digest.update(name.encode())
            with open(os.path.join(csrc_dir, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]
