"""Run by tests/test_npu_install.py in a fresh interpreter (one spawn for both installs):
fag_numba.flash_attn.install() and what flash-attn clients import; install_as_torch_npu(), the
probes third-party code makes, then transformers' own NPU flash-attention path on a tiny Llama
against attn_implementation="sdpa" (logits, loss, gradients; padded batch -> varlen path).
Prints "OK <max errors>" on success; any failure raises."""
import copy
import importlib.util
import sys

import fag_numba.flash_attn as ffa
import fag_numba.torch as fnt

# --- flash_attn -------------------------------------------------------------------------------
assert importlib.util.find_spec("flash_attn") is None, "a flash_attn exists before the install"
fa_mod = ffa.install()
assert ffa.install() is fa_mod
import flash_attn  # noqa: E402
from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: E402
from flash_attn.flash_attn_interface import (_flash_attn_backward,  # noqa: E402,F401
                                             _flash_attn_forward, _flash_attn_varlen_backward,
                                             _flash_attn_varlen_forward)

assert flash_attn is fa_mod and importlib.util.find_spec("flash_attn.flash_attn_interface")
assert flash_attn.__version__.startswith("2.8") and flash_attn_func is ffa.flash_attn_func
del sys.modules["flash_attn"], sys.modules["flash_attn.flash_attn_interface"]
import flash_attn.flash_attn_interface as fai  # noqa: E402
assert fai._flash_attn_forward is ffa._flash_attn_forward

# --- torch_npu --------------------------------------------------------------------------------

assert importlib.util.find_spec("torch_npu") is None, "a torch_npu exists before the install"
mod = fnt.install_as_torch_npu()
assert fnt.install_as_torch_npu() is mod                       # idempotent

import torch  # noqa: E402
import torch_npu  # noqa: E402

assert torch_npu is mod and importlib.util.find_spec("torch_npu") is not None
assert torch.npu.is_available() and torch.npu.device_count() == 1
del sys.modules["torch_npu"]                                   # the finder serves it again
import torch_npu  # noqa: E402,F811
assert torch_npu is mod
from torch_npu import npu_fusion_attention, npu_fusion_attention_grad  # noqa: E402,F401
import torch_npu.npu  # noqa: E402,F401

calls = {"n": 0, "layouts": set()}
_real = torch_npu.npu_fusion_attention


def counting(*args, **kwargs):
    calls["n"] += 1
    calls["layouts"].add(kwargs.get("input_layout", args[4] if len(args) > 4 else None))
    return _real(*args, **kwargs)


torch_npu.npu_fusion_attention = counting     # transformers binds the name at import

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from transformers.utils import is_torch_npu_available  # noqa: E402

assert is_torch_npu_available() and is_torch_npu_available(check_device=True)

cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
m_npu = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="flash_attention_2",
                                         dtype=torch.float32)
m_ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa",
                                         dtype=torch.float32)
m_ref.load_state_dict(m_npu.state_dict())
assert m_npu.config._attn_implementation == "flash_attention_2"

ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
mask = torch.ones(2, 13, dtype=torch.long)
mask[1, :4] = 0                                                # left padding: the varlen path
worst = 0.0
for model_mask in (None, mask):
    outs = []
    for m in (m_npu, m_ref):
        m.zero_grad()
        o = m(input_ids=ids, attention_mask=model_mask, labels=ids)
        o.loss.backward()
        outs.append((o.logits.detach(), o.loss.detach(),
                     {k: p.grad.clone() for k, p in m.named_parameters()}))
    (la, sa, ga), (lb, sb, gb) = outs
    keep = torch.ones_like(la[..., 0], dtype=torch.bool) if model_mask is None else model_mask.bool()
    err = (la - lb)[keep].abs().max().item() / max(1.0, lb[keep].abs().max().item())
    worst = max(worst, err)
    assert err < 1e-4, ("logits", err)
    if model_mask is None:      # with padding, sdpa's padded rows differ by construction
        assert abs(sa.item() - sb.item()) < 1e-5 * max(1.0, abs(sb.item())), ("loss", sa, sb)
        for k in ga:
            e = (ga[k] - gb[k]).abs().max().item() / max(1e-3, gb[k].abs().max().item())
            worst = max(worst, e)
            assert e < 1e-3, ("grad", k, e)
assert calls["n"] >= 4 and {"BSND", "TND"} <= calls["layouts"], calls
print("OK", worst, sorted(calls["layouts"]))
