"""fag_numba: the Ascend FlashAttentionScoreGrad operator (and its forward) on the CPU.

Public API (SPEC.md §1): :func:`flash_attention_score`, :func:`flash_attention_score_grad`,
:func:`dropout_mask`, the long-run helpers of §10/§12 (:func:`merge_attention_outputs`,
:func:`softmax_lse`, :func:`chunked_attention_score(_grad)`), the result tuples, the error classes, thread control and ``__version__``.
Importing has no side effects: nothing compiles, no numba setting changes, torch is not
imported (``fag_numba.torch`` is the optional torch layer).
"""
from importlib.metadata import PackageNotFoundError, version as _version

from .api import (FlashAttentionGrads, FlashAttentionOutput, flash_attention_score,
                  flash_attention_score_grad, warmup)
from .chunks import chunked_attention_score, chunked_attention_score_grad, softmax_lse
from .dropout import dropout_mask
from .errors import FagError, FagMemoryError, FagTypeError, FagValueError
from .merge import merge_attention_outputs
from .threads import num_threads, runtime_info, set_num_threads, threads

try:
    __version__ = _version("fag_numba")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = [
    "flash_attention_score", "flash_attention_score_grad", "dropout_mask",
    "merge_attention_outputs", "softmax_lse", "chunked_attention_score",
    "chunked_attention_score_grad", "warmup",
    "FlashAttentionOutput", "FlashAttentionGrads", "FagError", "FagTypeError", "FagValueError",
    "FagMemoryError",
    "set_num_threads", "num_threads", "threads", "runtime_info", "__version__",
]
