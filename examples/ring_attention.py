"""Ring attention on CPU: one causal sequence sharded over two processes (gloo on loopback).

Run either with torchrun::

    torchrun --nproc_per_node 2 examples/ring_attention.py

or on its own (it then starts the two ranks itself)::

    python examples/ring_attention.py --world 2

Every rank builds the same full q, k, v (same seed), keeps its zigzag shard, runs
``fag_numba.torch.ring_attention`` forward and backward, and checks its shard of the output
and of the gradients against a one-process call on the full tensors.
"""
import argparse
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

import fag_numba.torch as ft


def rank_main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    B, S, N1, N2, D = 1, 1024, 4, 2, 64                 # GQA: 4 query heads, 2 kv heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, n, D, generator=g) for n in (N1, N2, N2))
    dy = torch.randn(B, S, N1, D, generator=g)
    # this rank's zigzag shard (chunks rank and 2*world-1-rank of 2*world)
    qs, ks, vs, dys = (ft.shard_sequence(x, "BSND", rank, world, "zigzag") for x in (q, k, v, dy))
    for x in (qs, ks, vs):
        x.requires_grad_()
    out = ft.ring_attention(qs, ks, vs, N1, "BSND", causal=True, split="zigzag")
    out.backward(dys)
    # the same on one process, unsharded
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)
    ref = ft.flash_attention(qf, kf, vf, N1, "BSND", atten_mask=mask, sparse_mode=3)
    ref.backward(dy)
    for name, a, b in (("out", out, ref), ("dq", qs.grad, qf.grad), ("dk", ks.grad, kf.grad),
                       ("dv", vs.grad, vf.grad)):
        err = (a - ft.shard_sequence(b, "BSND", rank, world, "zigzag")).abs().max().item()
        print(f"rank {rank}: {name} max |ring - one process| = {err:.2e}", flush=True)
        assert err < 1e-4
    dist.destroy_process_group()


def launch(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       NUMBA_NUM_THREADS="1"))
             for r in range(world)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=0, help="start this many ranks locally")
    a = ap.parse_args()
    if a.world:
        launch(a.world)
    else:
        rank_main()
