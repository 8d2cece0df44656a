"""Subprocess worker of tests/test_reliability.py: concurrent Python-thread calls leave BLAS at
its thread count, and a forked child (os.fork, 'fork' Pool, ProcessPoolExecutor) either computes
correctly (fag_numba runs its chunks on Python threads, no OpenMP), never hangs.  Prints one
line per check.

With the argument "torch": torch is imported and runs a parallel op first, so the main
thread's calls run their chunks on torch's OpenMP team (omp.py), and the children must not hang
in libgomp (fag_numba releases the team before each fork) and compute torch's ops too."""
import sys, os, threading, time
WITH_TORCH = sys.argv[1:] == ["torch"]
if WITH_TORCH:
    import torch
    torch.set_num_threads(2)
    _x = torch.randn(512, 512)
    (_x @ _x).sum()
import numpy as np
import fag_numba, numba
# these calls are small: keep them on the worker threads (planning.chunk_count), which is what
# this worker checks
fag_numba.config.SERIAL_WORK_FWD = fag_numba.config.SERIAL_WORK_BWD = 0
from threadpoolctl import threadpool_info
q = np.random.default_rng(0).standard_normal((1, 2, 300, 32)).astype(np.float32)
if WITH_TORCH:
    # torch's team exists (its op above), fag_numba has not used it: a child forked now must
    # not hang on it in its first multi-threaded call, nor in torch's next op
    with fag_numba.threads(1):
        ref1 = fag_numba.flash_attention_score(q, q, q, 2, "BNSD").attention_out
    pid = os.fork()
    if pid == 0:
        r = fag_numba.flash_attention_score(q, q, q, 2, "BNSD").attention_out
        os._exit(3 if np.array_equal(r, ref1) and float((_x @ _x).sum()) != 0 else 5)
    _, st = os.waitpid(pid, 0)
    print("early fork child exit", os.waitstatus_to_exitcode(st), flush=True)
before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
ref = fag_numba.flash_attention_score(q, q, q, 2, "BNSD").attention_out
errs = []
def work():
    try:
        for _ in range(3):
            o = fag_numba.flash_attention_score_grad(q, q, q, q, 2, "BNSD")
            r = fag_numba.flash_attention_score(q, q, q, 2, "BNSD").attention_out
            assert np.array_equal(r, ref)
    except Exception as e:
        errs.append(repr(e))
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
after = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
print("blas before", before, "after", after, "errs", errs, flush=True)
assert set(after) == set(before) and not errs
if WITH_TORCH:
    from fag_numba import omp
    print("openmp used", omp._used, flush=True)


def torch_ok():
    """A parallel torch op gives the parent's result (no libgomp hang in a child)."""
    return not WITH_TORCH or float((_x @ _x).sum()) == TORCH_SUM


TORCH_SUM = float((_x @ _x).sum()) if WITH_TORCH else None
# fork after use
pid = os.fork()
if pid == 0:
    try:
        r = fag_numba.flash_attention_score(q, q, q, 2, "BNSD").attention_out
        code = 3 if np.array_equal(r, ref) and torch_ok() else 5
    except BaseException:
        code = 4
    os._exit(code)
_, st = os.waitpid(pid, 0)
print("fork child exit", os.waitstatus_to_exitcode(st), flush=True)
import multiprocessing as mp
def job(_):
    assert torch_ok()
    return float(fag_numba.flash_attention_score(q, q, q, 2, "BNSD").attention_out.sum())
want = [job(0)] * 2
with mp.get_context("fork").Pool(2) as p:
    print("pool ok", p.map(job, range(2), chunksize=1) == want, flush=True)
from concurrent.futures import ProcessPoolExecutor
with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as ex:
    print("ppe ok", list(ex.map(job, range(2))) == want, flush=True)
# the parent's own calls still run (a new team after the release)
r = fag_numba.flash_attention_score(q, q, q, 2, "BNSD").attention_out
print("parent after forks ok", np.array_equal(r, ref) and torch_ok(), flush=True)
