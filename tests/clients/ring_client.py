"""Run by tests/test_ring_flash_attn.py: ring-flash-attn (unchanged, from PyPI) on 2 gloo
processes in bf16 over fag_numba.flash_attn.install(); its causal ring and zigzag-ring
attention (forward and backward) vs a single-process fag_numba.flash_attn call on the full
sequence.  Usage: ring_client.py PORT.  Prints "OK ..." from rank 0; any failure raises."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B, S, H, D = 1, 48, 2, 16


def _full():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, S, H, D, generator=g).to(torch.bfloat16) for _ in range(4)]


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / max(1.0, b.float().abs().max())).item()


def _skip_hf_adapter():
    """ring-flash-attn 0.1.8's package __init__ imports its Hugging Face adapter, which imports
    names transformers 5 no longer has (is_flash_attn_greater_or_equal_2_10): a ring-flash-attn
    / transformers incompatibility unrelated to attention.  Stand in for that one subpackage;
    the ring code itself runs unchanged."""
    import types
    stub = types.ModuleType("ring_flash_attn.adapters")
    stub.substitute_hf_flash_attn = stub.update_ring_flash_attn_params = None
    sys.modules["ring_flash_attn.adapters"] = stub


def worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import fag_numba
    import fag_numba.flash_attn as ffa
    fag_numba.set_num_threads(1)          # two processes on the 2-core CI box
    ffa.install()
    _skip_hf_adapter()
    from ring_flash_attn import ring_flash_attn_func, zigzag_ring_flash_attn_func

    q, k, v, dout = _full()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    if rank == 1:
        dist.barrier()        # rank 0 compiles into the shared on-disk cache first
    ffa.flash_attn_func(*ref, causal=True).backward(dout)
    if rank == 0:
        dist.barrier()
    ref_out = ffa.flash_attn_func(q, k, v, causal=True)

    def contiguous(t):
        return t[:, rank * S // 2:(rank + 1) * S // 2]

    def zigzag(t):
        c = t.chunk(4, dim=1)
        return torch.cat([c[rank], c[3 - rank]], dim=1)

    worst = {}
    for name, fn, shard in (("ring", ring_flash_attn_func, contiguous),
                            ("zigzag", zigzag_ring_flash_attn_func, zigzag)):
        loc = [shard(t).detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*loc, causal=True)
        out.backward(shard(dout))
        errs = [_rel(out, shard(ref_out))] + [_rel(a.grad, shard(r.grad))
                                              for a, r in zip(loc, ref)]
        worst[name] = max(errs)
        # bf16 outputs, per-step block results rounded to bf16 by ring-flash-attn itself: a few
        # bf16 ulps (2**-7 each) of the magnitude; a wrong mask / lse / buffer gives O(1)
        assert worst[name] < 4 * 2.0 ** -7, (name, rank, errs)
    dist.barrier()
    if rank == 0:
        print("OK", worst)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]),), nprocs=2, join=True)
