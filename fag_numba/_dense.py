"""A tiny dense float64 attention (forward + backward) for the demo and ``selftest``.

Deliberately separate from the tiled kernels (and from tests/reference.py, which the installed
package does not ship): it materialises S1 x S2, so it is for small problems only.
Covers BNSD, GQA, scale, and an optional boolean "computed" matrix.
"""
import numpy as np


def dense_attention(q, k, v, dy, scale, computed=None):
    """q [B,N1,S1,D], k [B,N2,S2,D], v [B,N2,S2,Dv], dy [B,N1,S1,Dv] -> (o, lse, dq, dk, dv)."""
    q, k, v, dy = (np.asarray(x, np.float64) for x in (q, k, v, dy))
    g = q.shape[1] // k.shape[1]
    kk = np.repeat(k, g, axis=1)
    vv = np.repeat(v, g, axis=1)
    z = np.einsum("bhid,bhjd->bhij", q, kk) * scale
    c = np.ones(z.shape[-2:], bool) if computed is None else computed
    z = np.where(c, z, -np.inf)
    m = z.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(c, np.exp(z - m), 0.0)
    l = e.sum(-1, keepdims=True)
    p = np.divide(e, l, out=np.zeros_like(e), where=l > 0)
    o = p @ vv
    dp = dy @ vv.transpose(0, 1, 3, 2)
    ds = p * (dp - (dy * o).sum(-1, keepdims=True))
    dq = scale * ds @ kk
    dkk = scale * ds.transpose(0, 1, 3, 2) @ q
    dvv = p.transpose(0, 1, 3, 2) @ dy
    b, n2 = k.shape[:2]
    dk = dkk.reshape(b, n2, g, *dkk.shape[2:]).sum(2)
    dv = dvv.reshape(b, n2, g, *dvv.shape[2:]).sum(2)
    return o, (m + np.log(np.where(l > 0, l, 1.0)))[..., 0], dq, dk, dv
