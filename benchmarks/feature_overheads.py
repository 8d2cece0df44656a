"""Feature-overhead bars of issues 3-7: A/B alternating medians in one process.

    python benchmarks/feature_overheads.py [ROUNDS] [causal band alibi dropout fp8 tnd threads]

Each line prints the two medians and the ratio the issue bounds (the bar in parentheses):
causal <= 0.6 x dense and <= 1.5 x torch causal; band <= 1.3 x (band area share x dense);
generated ALiBi <= 1.15 x no pse; seed dropout (keep 0.9) <= 1.25 x none; fp8 <= 1.15 x fp32;
one TND varlen call <= 1.2 x the separate per-sequence calls, and its 1-thread / 2-thread
speed-up (both cores used).
"""
import sys, time
import torch  # before numba starts its OpenMP pool (else torch runs ~10x slower)
import numpy as np, numba, ml_dtypes
import fag_numba
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
CAUSAL = np.triu(np.ones((2048, 2048), bool), 1)
rng = np.random.default_rng(0)

def qkv(B, N, S, D, dt=np.float32):
    return [rng.standard_normal((B, N, S, D)).astype(np.float32).astype(dt) for _ in range(4)]

def grad_fn(q, k, v, dy, N, layout="BNSD", **kw):
    o = fag_numba.flash_attention_score(q, k, v, N, layout, **kw)
    return lambda: fag_numba.flash_attention_score_grad(
        q, k, v, dy, N, layout, softmax_max=o[1], softmax_sum=o[2], attention_in=o[0], **kw)

def ab(fns, rounds=ROUNDS):
    for f in fns: f()
    ts = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t = time.perf_counter(); f(); ts[i].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in ts]

def torch_bwd(B, N, S, D, causal):
    torch.set_num_threads(numba.get_num_threads())
    q, k, v, dy = [torch.randn(B, N, S, D) for _ in range(4)]
    sc = 1 / np.sqrt(D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=sc)
    return lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dy, q, k, v, out, lse, 0.0, causal, scale=sc)

which = sys.argv[2:] or ["causal", "band", "alibi", "dropout", "fp8", "tnd", "threads"]
if "causal" in which:
    for (B, N, S, D) in [(1, 8, 2048, 128), (1, 4, 4096, 64)]:
        q, k, v, dy = qkv(B, N, S, D); sc = 1 / np.sqrt(D)
        dense = grad_fn(q, k, v, dy, N, scale_value=sc)
        causal = grad_fn(q, k, v, dy, N, scale_value=sc, atten_mask=CAUSAL, sparse_mode=3)
        td, tc, tt, ttd = ab([dense, causal, torch_bwd(B, N, S, D, True), torch_bwd(B, N, S, D, False)])
        print(f"causal {(B,N,S,D)}: dense {td*1e3:.0f} ms, causal {tc*1e3:.0f} ms (x{tc/td:.2f} of dense; bar 0.6), "
              f"torch causal {tt*1e3:.0f} ms -> ratio {tc/tt:.2f} (bar 1.5); torch dense {ttd*1e3:.0f} -> dense ratio {td/ttd:.2f}", flush=True)
if "band" in which:
    S, D = 16384, 64
    q, k, v, dy = qkv(1, 1, S, D); sc = 1 / np.sqrt(D)
    band = grad_fn(q, k, v, dy, 1, scale_value=sc, atten_mask=CAUSAL, sparse_mode=4, pre_tokens=256, next_tokens=256)
    dense = grad_fn(q, k, v, dy, 1, scale_value=sc)
    tb, td = ab([band, dense], rounds=max(1, ROUNDS - 1))
    i = np.arange(S)[:, None]
    area = sum(min(S, r + 257) - max(0, r - 256) for r in range(S)) / S / S
    print(f"band S={S} pre=next=256: band {tb*1e3:.0f} ms, dense {td*1e3:.0f} ms, area {area:.4f}: "
          f"band / (area*dense) = {tb/(area*td):.2f} (bar 1.3)", flush=True)
B, N, S, D = 1, 8, 2048, 128
q, k, v, dy = qkv(B, N, S, D); sc = 1 / np.sqrt(D)
if "alibi" in which:
    slopes = (2.0 ** -np.arange(1, N + 1)).astype(np.float32)
    t0, t1 = ab([grad_fn(q, k, v, dy, N, scale_value=sc), grad_fn(q, k, v, dy, N, scale_value=sc, pse=slopes, pse_type=2)])
    print(f"alibi {(B,N,S,D)}: none {t0*1e3:.0f} ms, generated ALiBi {t1*1e3:.0f} ms: x{t1/t0:.2f} (bar 1.15)", flush=True)
if "dropout" in which:
    t0, t1 = ab([grad_fn(q, k, v, dy, N, scale_value=sc), grad_fn(q, k, v, dy, N, scale_value=sc, keep_prob=0.9, seed=7)])
    print(f"dropout {(B,N,S,D)}: none {t0*1e3:.0f} ms, seed keep 0.9 {t1*1e3:.0f} ms: x{t1/t0:.2f} (bar 1.25)", flush=True)
if "fp8" in which:
    q8, k8, v8, dy8 = [x.astype(ml_dtypes.float8_e4m3fn) for x in (q, k, v, dy)]
    t0, t1 = ab([grad_fn(q, k, v, dy, N, scale_value=sc), grad_fn(q8, k8, v8, dy8, N, scale_value=sc)])
    print(f"fp8 e4m3 {(B,N,S,D)}: fp32 {t0*1e3:.0f} ms, fp8 {t1*1e3:.0f} ms: x{t1/t0:.2f} (bar 1.15)", flush=True)
if "tnd" in which:
    lens = [4096, 1024, 512, 512, 256, 256, 128, 128]; N, D = 8, 64; T = sum(lens)
    cu = list(np.cumsum(lens))
    q, k, v, dy = [rng.standard_normal((T, N, D)).astype(np.float32) for _ in range(4)]
    sc = 1 / np.sqrt(D)
    tnd = grad_fn(q, k, v, dy, N, "TND", scale_value=sc, atten_mask=CAUSAL, sparse_mode=3, actual_seq_qlen=cu, actual_seq_kvlen=cu)
    parts = []
    st = 0
    for L in lens:
        sl = slice(st, st + L); st += L
        parts.append(grad_fn(q[sl], k[sl], v[sl], dy[sl], N, "TND", scale_value=sc, atten_mask=CAUSAL, sparse_mode=3, actual_seq_qlen=[L], actual_seq_kvlen=[L]))
    sep = lambda: [p() for p in parts]
    t1, t0 = ab([tnd, sep])
    print(f"TND varlen {lens} N=8 D=64 causal: one call {t1*1e3:.0f} ms, separate calls {t0*1e3:.0f} ms: x{t1/t0:.2f} (bar 1.2)", flush=True)
if "threads" in which:
    lens = [4096, 1024, 512, 512, 256, 256, 128, 128]; N, D = 8, 64; T = sum(lens)
    cu = list(np.cumsum(lens))
    q, k, v, dy = [rng.standard_normal((T, N, D)).astype(np.float32) for _ in range(4)]
    tnd = grad_fn(q, k, v, dy, N, "TND", scale_value=0.125, atten_mask=CAUSAL, sparse_mode=3,
                  actual_seq_qlen=cu, actual_seq_kvlen=cu)
    def one():
        with fag_numba.threads(1):
            tnd()
    t1, t2 = ab([one, tnd])
    print(f"TND varlen threads: 1 thread {t1*1e3:.0f} ms, {numba.get_num_threads()} threads "
          f"{t2*1e3:.0f} ms: speed-up x{t1/t2:.2f}", flush=True)
