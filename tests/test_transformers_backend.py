"""The "fag_numba" attention implementation for transformers (SPEC §11, fag_numba/transformers.py)
on tiny randomly initialised models against the same weights under attn_implementation="sdpa":
Llama (causal, GQA), Qwen2 and Mistral (sliding windows, sparse mode 4), BERT (bidirectional);
unpadded and padded batches (TND varlen), packed rows, logits / loss / every parameter gradient,
a few AdamW steps, greedy generate (KV-cache decode, S1 < S2), dropout.  Tolerance: MODEL in
tests/tolerances.py."""
import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fag_numba.transformers as fnt  # noqa: E402
from tests.tolerances import MODEL  # noqa: E402

fnt.register()

V, S = 61, 13


def _cfg(kind, **kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64)
    if kind == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **base, **kw)
    if kind == "qwen2":   # every layer a 4-token window
        kw = dict(dict(sliding_window=4), **kw)
        return transformers.Qwen2Config(num_key_value_heads=2, use_sliding_window=True,
                                        max_window_layers=0, **base, **kw)
    if kind == "mistral":
        kw = dict(dict(sliding_window=5), **kw)
        return transformers.MistralConfig(num_key_value_heads=1, **base, **kw)
    if kind == "bert":
        return transformers.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=64, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, **kw)
    raise ValueError(kind)


def _pair(kind, **kw):
    cls = transformers.AutoModelForMaskedLM if kind == "bert" else transformers.AutoModelForCausalLM

    def make(cfg, impl):
        return cls.from_config(cfg, attn_implementation=impl)

    torch.manual_seed(0)
    ours = make(_cfg(kind, **kw), "fag_numba")
    ref = make(_cfg(kind, **kw), "sdpa")
    ref.load_state_dict(ours.state_dict())
    ours.eval()
    ref.eval()
    assert ours.config._attn_implementation == "fag_numba"
    assert ref.config._attn_implementation == "sdpa"
    return ours, ref


def _rel(a, b, floor=1.0):
    return (a - b).abs().max().item() / max(floor, b.abs().max().item())


def _batch(padded, b=3, left=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (b, S), generator=g)
    mask = torch.ones(b, S, dtype=torch.long)
    if padded:
        for r, n in enumerate((0, 5, S)[:b]):     # no padding, 5 padded tokens, a fully padded row
            if left:
                mask[r, :n] = 0
            else:
                mask[r, S - n:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _run(model, ids, mask, labels, **kw):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone()
                                                     for n, p in model.named_parameters()
                                                     if p.grad is not None}


def _compare(ours, ref, ids, mask, labels, **kw):
    la, sa, ga = _run(ours, ids, mask, labels, **kw)
    lb, sb, gb = _run(ref, ids, mask, labels, **kw)
    keep = (mask if mask is not None else torch.ones_like(ids)).bool()
    assert _rel(la[keep], lb[keep]) <= MODEL.atol
    assert _rel(sa, sb) <= MODEL.atol
    assert ga.keys() == gb.keys() and len(ga) > 5
    for n in ga:
        assert _rel(ga[n], gb[n], 1e-3) <= MODEL.atol, n


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "bert"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_logits_loss_grads_vs_sdpa(kind, padded):
    ours, ref = _pair(kind)
    ids, mask, labels = _batch(padded, left=kind != "bert")
    if not padded:
        mask = None
    if padded and kind != "bert":
        mask, labels = mask[:2], labels[:2]     # sdpa's fully padded causal row is NaN
        ids = ids[:2]
    _compare(ours, ref, ids, mask, labels)


def test_padding_runs_as_varlen_without_padded_compute(monkeypatch):
    """The padded batch reaches fag_numba as TND holding only the real tokens."""
    import fag_numba.torch as ft
    seen = []
    real = ft.flash_attention

    def spy(q, k, v, n, layout, **kw):
        seen.append((layout, q.shape[0], k.shape[0], kw.get("actual_seq_qlen")))
        return real(q, k, v, n, layout, **kw)

    monkeypatch.setattr(ft, "flash_attention", spy)
    ours, _ = _pair("llama")
    ids, mask, _ = _batch(True)
    with torch.no_grad():
        ours(input_ids=ids, attention_mask=mask)
    tokens = int(mask.sum())
    assert seen and all(s == ("TND", tokens, tokens, [S, 2 * S - 5, 2 * S - 5]) for s in seen), seen


def test_window_is_applied():
    """Guard: the windowed models differ from the same model without its window (so the sdpa
    comparison above would catch a dropped window)."""
    ours, _ = _pair("qwen2")
    wide, _ = _pair("qwen2", sliding_window=64)
    wide.load_state_dict(ours.state_dict())
    ids, _, _ = _batch(False)
    with torch.no_grad():
        assert _rel(ours(input_ids=ids).logits, wide(input_ids=ids).logits) > 1e-2


def test_packed_rows_vs_sdpa():
    """Two sequences packed in one row (position_ids restart, no mask): TND, like sdpa's
    block-diagonal mask."""
    for kind in ("llama", "mistral"):
        ours, ref = _pair(kind)
        ids, _, _ = _batch(False, b=1)
        pos = torch.tensor([list(range(6)) + list(range(S - 6))])
        _compare(ours, ref, ids, None, ids, position_ids=pos, use_cache=False)   # sdpa packs only without a cache


def test_training_steps_vs_sdpa():
    ours, ref = _pair("llama")
    ids, mask, labels = _batch(True, b=2)
    losses = []
    for m in (ours, ref):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        ls = []
        for _ in range(4):
            opt.zero_grad()
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            ls.append(loss.item())
        losses.append(torch.tensor(ls))
    assert losses[0][-1] < losses[0][0]
    assert _rel(losses[0], losses[1]) <= MODEL.atol


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_generate_vs_sdpa(kind):
    """KV-cache decode (S1 = 1 < S2) with a left-padded batch: the same tokens as sdpa."""
    ours, ref = _pair(kind)
    ids, mask, _ = _batch(True, b=2)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    a = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    b = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    assert a.shape[1] == S + 8 and torch.equal(a, b)


def test_dropout_in_training():
    ours, _ = _pair("llama", attention_dropout=0.5)
    ids, _, _ = _batch(False, b=2)
    ours.train()
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        ours.zero_grad()
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        outs.append((loss.item(), ours.lm_head.weight.grad.clone()))
    assert outs[0][0] == outs[1][0] and torch.equal(outs[0][1], outs[1][1])   # seeded
    assert outs[0][0] != outs[2][0]                                           # bits matter
    assert all(torch.isfinite(g).all() for _, g in outs)
    ours.eval()
    with torch.no_grad():
        e1, e2 = (ours(input_ids=ids, labels=ids).loss.item() for _ in range(2))
    assert e1 == e2 != outs[0][0]                                             # eval: no dropout
