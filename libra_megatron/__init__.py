"""libra-megatron: train Libra-style multimodal LLMs (routed visual expert + cross-modal bridge) on megatron-core."""

__version__ = "0.1.0"

import torch as _torch  # noqa: F401  (loads libc10/libtorch so `import libra_megatron._C` resolves its symbols)
