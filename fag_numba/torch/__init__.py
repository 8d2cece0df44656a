"""torch layer of fag_numba (SPEC §11, §12).

``import fag_numba`` never imports this package (nor torch); ``import fag_numba.torch`` does.
Porting NPU code is a one-line change::

    import fag_numba.torch as torch_npu        # instead of: import torch_npu

One module per job (STYLE b2b):

- ``npu.py``: torch_npu-compatible ``npu_fusion_attention(_grad)(_v2)``, the autograd
  ``FlashAttentionFunction`` / ``flash_attention``, the custom ops and the dtype bridges
  (its docstring holds the decisions of the torch layer).
- ``ring.py``: :func:`ring_attention` over torch.distributed (K/V shards travel around the
  ring, float32 merging and dK/dV accumulation) and :func:`shard_sequence` /
  :func:`unshard_sequence` (contiguous and zigzag splits).
- ``npu_install.py``: :func:`install_as_torch_npu`, fag_numba.torch as the ``torch_npu`` package
  of third-party code (transformers, yunchang, MindSpeed-style ``find_spec``/``import``).
"""
import torch  # noqa: F401  (the real torch: absolute import, never this package)

from . import npu
from .npu import *  # noqa: F401,F403  (the public names listed in npu.__all__)
from .npu import _Opts, _op_args  # noqa: F401  (used by the tests of the custom-op schema)
from .npu_install import install_as_torch_npu
from .ring import ring_attention, shard_sequence, unshard_sequence

__all__ = list(npu.__all__) + ["install_as_torch_npu", "ring_attention", "shard_sequence",
                               "unshard_sequence"]
