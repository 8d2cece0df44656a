"""One rank of the ring-attention test job (spawned by tests/test_ring.py; not a test module).

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (gloo on loopback), RING_RESULTS (the
directory this rank writes ``rank<r>.json`` into).  Runs every case in one process group and
records, per case, whether it passed and the worst error, so the parent test can report all
of them at once.  Each case compares the ring (forward and every gradient) with a one-process
fag_numba call on the unsharded tensors (every rank computes that reference itself).
"""
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch  # noqa: I001  (torch before numba's OpenMP pool, see benchmarks/README)
import torch.distributed as dist
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fag_numba  # noqa: E402
import fag_numba.torch as ft  # noqa: E402
from fag_numba import FagError, FagValueError  # noqa: E402
from tolerances import tolerance  # noqa: E402
from utils import assert_close  # noqa: E402

TRI = np.triu(np.ones((2048, 2048), bool), 1)
RESULTS = []


def record(name, fn):
    try:
        detail = fn()
        RESULTS.append({"case": name, "ok": True, "detail": detail})
    except Exception as e:  # noqa: BLE001  (reported to the parent test)
        RESULTS.append({"case": name, "ok": False,
                        "detail": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"})


def _np(t):
    return ft.tensor_to_numpy(t)


def reference(q, k, v, dy, n1, layout, causal, scale, keep_prob, seed, slopes):
    """One-process fag_numba forward + grad of the full tensors (numpy)."""
    kw = dict(scale_value=scale)
    if causal:
        kw.update(atten_mask=TRI, sparse_mode=2)
    if keep_prob < 1:
        kw.update(keep_prob=keep_prob, seed=seed)
    if slopes is not None:
        kw.update(pse=slopes, pse_type=2)
    f = fag_numba.flash_attention_score(_np(q), _np(k), _np(v), n1, layout, **kw)
    g = fag_numba.flash_attention_score_grad(_np(q), _np(k), _np(v), _np(dy), n1, layout,
                                             softmax_max=f.softmax_max,
                                             softmax_sum=f.softmax_sum,
                                             attention_in=f.attention_out, **kw)
    return f.attention_out, g.dq, g.dk, g.dv


def ring_case(rank, world, layout="BSND", split="zigzag", causal=False, dtype=torch.float32,
              B=1, N1=4, N2=2, S_per=6, D=8, Dv=8, keep_prob=1.0, seed=None, alibi=False,
              group=None, gworld=None):
    gworld = world if gworld is None else gworld
    S = S_per * gworld
    g = torch.Generator().manual_seed(1234)         # the same full tensors on every rank

    def full(n, d):
        shape = {"BSND": (B, S, n, d), "BNSD": (B, n, S, d), "BSH": (B, S, n * d),
                 "SBH": (S, B, n * d)}[layout]
        return torch.randn(shape, generator=g).to(dtype)
    q, k, v, dy = full(N1, D), full(N2, D), full(N2, Dv), full(N1, Dv)
    slopes = torch.rand(N1, generator=g) if alibi else None
    scale = 0.37
    ref = reference(q, k, v, dy, N1, layout, causal, scale, keep_prob, seed,
                    None if slopes is None else _np(slopes))
    r = rank if group is None else 0
    qs, ks, vs, dys = (ft.shard_sequence(x, layout, r, gworld, split).requires_grad_(x is not dy)
                       for x in (q, k, v, dy))
    out = ft.ring_attention(qs, ks, vs, N1, layout, group=group, causal=causal, split=split,
                            scale=scale, keep_prob=keep_prob, seed=seed, alibi_slopes=slopes)
    out.backward(dys)
    key = "fp32" if dtype == torch.float32 else ("bf16" if dtype == torch.bfloat16 else "fp16")
    errs = {}
    for name, got, want, kind in (("out", out, ref[0], "fwd"), ("dq", qs.grad, ref[1], "bwd"),
                                  ("dk", ks.grad, ref[2], "bwd"), ("dv", vs.grad, ref[3], "bwd")):
        assert got.dtype == dtype, (name, got.dtype)
        w = ft.shard_sequence(want, layout, r, gworld, split)
        gn = _np(got.detach())
        assert_close(gn, w, tolerance(key, kind), name)
        errs[name] = float(np.abs(gn.astype(np.float64) - w.astype(np.float64)).max())
    return errs


def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    fag_numba.set_num_threads(1)
    cases = []
    for split in ("contiguous", "zigzag"):
        for causal in (False, True):
            cases.append((f"{split}-causal{int(causal)}-gqa-fp32",
                          dict(split=split, causal=causal)))
    cases += [
        ("zigzag-causal-bf16", dict(causal=True, dtype=torch.bfloat16)),
        ("contiguous-full-fp16-BNSD", dict(split="contiguous", dtype=torch.float16,
                                           layout="BNSD")),
        ("zigzag-causal-alibi-BSH", dict(causal=True, alibi=True, layout="BSH")),
        ("contiguous-full-alibi-SBH-mqa", dict(split="contiguous", alibi=True, layout="SBH",
                                               N2=1, Dv=6)),
        ("zigzag-causal-dropout", dict(causal=True, keep_prob=0.7, seed=99)),
        ("contiguous-causal-dropout-alibi", dict(split="contiguous", causal=True,
                                                 keep_prob=0.8, seed=5, alibi=True)),
        ("zigzag-full-B2", dict(B=2, S_per=8)),
    ]
    for name, kw in cases:
        record(name, lambda kw=kw: ring_case(rank, world, **kw))

    # a group of one rank is the plain call (one pair, no communication): bitwise equal
    groups = [dist.new_group([r]) for r in range(world)]

    def group_of_one():
        gen = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(1, 10, 2, 8, generator=gen) for _ in range(3))
        for causal in (False, True):
            out = ft.ring_attention(q, k, v, 2, "BSND", group=groups[rank], causal=causal,
                                    scale=0.3)
            kw = dict(atten_mask=TRI, sparse_mode=3) if causal else {}
            want = fag_numba.flash_attention_score(_np(q), _np(k), _np(v), 2, "BSND",
                                                   scale_value=0.3, **kw).attention_out
            assert np.array_equal(_np(out), want), np.abs(_np(out) - want).max()
        return ring_case(rank, world, group=groups[rank], gworld=1, causal=True, keep_prob=0.9,
                         seed=3)
    record("group-of-one", group_of_one)

    def round_trips():
        gen = torch.Generator().manual_seed(3)
        for layout, shape in (("BSND", (2, 8 * world, 3, 4)), ("BNSD", (2, 3, 8 * world, 4)),
                              ("BSH", (1, 4 * world, 6)), ("SBH", (4 * world, 2, 6))):
            x = torch.randn(shape, generator=gen)
            for split in ("contiguous", "zigzag"):
                shards = [ft.shard_sequence(x, layout, r, world, split) for r in range(world)]
                assert torch.equal(ft.unshard_sequence(shards, layout, split), x)
                xn = x.numpy()
                sn = [ft.shard_sequence(xn, layout, r, world, split) for r in range(world)]
                assert np.array_equal(ft.unshard_sequence(sn, layout, split), xn)
        # zigzag shard r = chunks r and 2W-1-r
        x = torch.arange(4 * world).reshape(1, 4 * world, 1, 1)
        s = ft.shard_sequence(x, "BSND", rank, world, "zigzag").reshape(-1).tolist()
        c = 2
        want = list(range(rank * c, rank * c + c)) + list(range((2 * world - 1 - rank) * c,
                                                                (2 * world - rank) * c))
        assert s == want, (s, want)
        for bad in (dict(split="ring"), dict(rank=world), dict(x=torch.zeros(1, 3, 1, 1))):
            a = dict(x=x, input_layout="BSND", rank=0, world=world, split="zigzag")
            a.update(bad)
            try:
                ft.shard_sequence(**a)
            except FagValueError:
                pass
            else:
                raise AssertionError(f"shard_sequence accepted {bad}")
    record("shard-unshard", round_trips)

    def raises_everywhere(make, exc, match):
        try:
            make()
        except exc as e:
            assert match in str(e), str(e)
            return str(e)[:160]
        raise AssertionError("no error")

    def mismatch():
        # rank 0 holds a longer shard: every rank raises FagValueError, nobody hangs
        s = 8 if rank == 0 else 6
        q = torch.randn(1, s, 2, 8)
        return raises_everywhere(lambda: ft.ring_attention(q, q, q, 2, "BSND"), FagValueError,
                                 "differ across ranks")
    record("mismatched-shards", mismatch)

    def bad_split():
        q = torch.randn(1, 6, 2, 8)
        return raises_everywhere(lambda: ft.ring_attention(q, q, q, 2, "BSND", split="ring"),
                                 FagValueError, "split")
    record("unknown-split", bad_split)

    def one_rank_bad_dtype():
        q = torch.randn(1, 6, 2, 8, dtype=torch.float64 if rank == world - 1 else torch.float32)
        exc = FagError if rank == world - 1 else FagValueError
        return raises_everywhere(lambda: ft.ring_attention(q, q, q, 2, "BSND"), exc,
                                 "query" if rank == world - 1 else f"rank {world - 1}")
    record("one-rank-bad-dtype", one_rank_bad_dtype)

    def still_works():       # the group is usable after the refusals
        return ring_case(rank, world, causal=True)
    record("after-errors", still_works)

    Path(os.environ["RING_RESULTS"], f"rank{rank}.json").write_text(json.dumps(RESULTS))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
