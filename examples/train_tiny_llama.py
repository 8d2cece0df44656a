"""Train a small randomly initialised Llama on the CPU with fag_numba attention vs torch's sdpa.

    python examples/train_tiny_llama.py                          # S = 2048, 4096, 8192
    python examples/train_tiny_llama.py --seq-lens 16384 --steps 3
    python examples/train_tiny_llama.py --smoke                  # seconds (what CI runs)

Each implementation trains the same model (same initial weights, same random token batches) for
``--steps`` AdamW steps with ``attn_implementation="fag_numba"`` (registered by
``fag_numba.transformers.register()``) or ``"sdpa"``, and reports training tokens/s (steps after
the first, which includes fag_numba's JIT compile) and memory: each run is a separate child
process, so ``peak RSS`` is that run's own high-water mark and ``peak - start`` what training
added on top of the loaded model.  ``--smoke`` runs a tiny model in this process (no memory
numbers) and checks that both losses agree.

The model is sized so that attention dominates at these lengths (4 heads of 64, 2 layers,
hidden 256, small MLP): at S tokens, attention costs ~4*S^2*256 flops per layer and pass against
~12*S*256^2 for the projections.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def train(impl, seq_len, steps, batch, hidden, layers, heads, kv_heads, vocab, dtype, seed=0):
    """Train ``steps`` AdamW steps; returns a dict of the measurements and the losses."""
    import torch
    import transformers

    import fag_numba.transformers
    fag_numba.transformers.register()
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=seq_len)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation=impl, dtype=getattr(torch, dtype))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    data = [torch.randint(0, vocab, (batch, seq_len), generator=g) for _ in range(steps)]
    start_rss = _rss_mb()
    losses, times = [], []
    for ids in data:
        t = time.perf_counter()
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    timed = times[1:] or times
    return dict(impl=impl, seq_len=seq_len, tokens_per_s=batch * seq_len * len(timed) / sum(timed),
                first_step_s=times[0], start_rss_mb=start_rss,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                losses=losses)


def _child(args, impl, seq_len):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--seq-lens", str(seq_len),
           "--steps", str(args.steps), "--batch", str(args.batch), "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--heads", str(args.heads), "--kv-heads",
           str(args.kv_heads), "--vocab", str(args.vocab), "--dtype", args.dtype]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{impl} at S={seq_len} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--steps", type=int, default=4, help="AdamW steps (the first is not timed)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--smoke", action="store_true", help="tiny, in-process, seconds (CI)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dims = dict(batch=args.batch, hidden=args.hidden, layers=args.layers, heads=args.heads,
                kv_heads=args.kv_heads, vocab=args.vocab, dtype=args.dtype)
    if args.child:
        print(json.dumps(train(args.child, args.seq_lens[0], args.steps, **dims)))
        return 0
    if args.smoke:
        dims.update(hidden=32, heads=4, kv_heads=2, vocab=97)
        res = [train(impl, 64, 3, **dims) for impl in ("fag_numba", "sdpa")]
        for r in res:
            print(f"{r['impl']:>9}  S=64  {r['tokens_per_s']:9.0f} tokens/s  losses "
                  + " ".join(f"{x:.5f}" for x in r["losses"]))
        diff = max(abs(a - b) for a, b in zip(res[0]["losses"], res[1]["losses"]))
        print(f"max loss difference fag_numba vs sdpa: {diff:.2e}")
        return 0 if diff < 1e-4 else 1
    print(f"Llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
          f"batch={args.batch} {args.dtype}, {args.steps} AdamW steps (first untimed)")
    print(f"{'S':>6} {'impl':>9} {'tokens/s':>10} {'1st step s':>10} {'peak RSS MB':>11} "
          f"{'peak-start':>10}")
    for s in args.seq_lens:
        rows = [_child(args, impl, s) for impl in ("fag_numba", "sdpa")]
        for r in rows:
            print(f"{s:>6} {r['impl']:>9} {r['tokens_per_s']:>10.0f} {r['first_step_s']:>10.1f} "
                  f"{r['peak_rss_mb']:>11.0f} {r['peak_rss_mb'] - r['start_rss_mb']:>10.0f}")
        print(f"{s:>6} ratio fag_numba/sdpa tokens/s = "
              f"{rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
