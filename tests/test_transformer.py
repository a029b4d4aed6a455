"""The transformer, module by module, against formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch

from khala_cli.engine.config import TransformerConfig
from khala_cli.engine.tokens import PAD
from khala_cli.engine.transformer import (
    ROW_MAX,
    RMSNorm,
    Span,
    Transformer,
    apply_rope,
    rope_angles,
    row_linear,
)

CFG = TransformerConfig(
    vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    ffn_hidden_size=48, norm_eps=1e-6, rope_base=10000.0, max_seq_len=64,
)


def make_model(cfg: TransformerConfig = CFG, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every term shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def test_state_dict_names_and_shapes():
    c = CFG
    qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    want = {
        "embed.weight": (c.vocab_size, c.hidden_size),
        "norm.weight": (c.hidden_size,),
        "output.weight": (c.vocab_size, c.hidden_size),
    }
    for i in range(c.num_layers):
        pre = f"layers.{i}."
        want |= {
            pre + "attn_norm.weight": (c.hidden_size,),
            pre + "attn.wq.weight": (qd, c.hidden_size), pre + "attn.wq.bias": (qd,),
            pre + "attn.wk.weight": (kvd, c.hidden_size), pre + "attn.wk.bias": (kvd,),
            pre + "attn.wv.weight": (kvd, c.hidden_size), pre + "attn.wv.bias": (kvd,),
            pre + "attn.wo.weight": (c.hidden_size, qd), pre + "attn.wo.bias": (c.hidden_size,),
            pre + "mlp_norm.weight": (c.hidden_size,),
            pre + "mlp.w_gate.weight": (c.ffn_hidden_size, c.hidden_size),
            pre + "mlp.w_gate.bias": (c.ffn_hidden_size,),
            pre + "mlp.w_up.weight": (c.ffn_hidden_size, c.hidden_size),
            pre + "mlp.w_up.bias": (c.ffn_hidden_size,),
            pre + "mlp.w_down.weight": (c.hidden_size, c.ffn_hidden_size),
            pre + "mlp.w_down.bias": (c.hidden_size,),
        }
    model = Transformer(CFG)
    model.setup_cache(2, 16)  # the cache and rotary tables stay out of the state dict
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want


def test_rmsnorm_formula():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 5, 16) * 7
    xd = x.double()
    want = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-5, atol=1e-6)
    # bf16 input: computed in fp32, rounded once
    xb = x.bfloat16()
    want_b = (xb.double() / torch.sqrt((xb.double() ** 2).mean(-1, keepdim=True) + 1e-5)
              * norm.weight.double()).bfloat16()
    assert norm(xb).dtype == torch.bfloat16
    torch.testing.assert_close(norm(xb), want_b, rtol=1e-2, atol=1e-2)


def rope_by_hand(x: torch.Tensor, positions: list[int], base: float) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) by position * base**(-2i/D), one number at a time."""
    out = x.clone().double()
    d = x.shape[-1]
    for si, pos in enumerate(positions):
        for i in range(d // 2):
            theta = pos * base ** (-2 * i / d)
            a, b = x[..., si, i].double(), x[..., si, i + d // 2].double()
            out[..., si, i] = a * math.cos(theta) - b * math.sin(theta)
            out[..., si, i + d // 2] = b * math.cos(theta) + a * math.sin(theta)
    return out


def test_rope_rotate_half():
    x = torch.randn(2, 3, 5, 8)
    positions = [0, 1, 7, 300, 25000]
    cos, sin = rope_angles(torch.tensor(positions), 8, 500000.0)
    got = apply_rope(x, cos, sin)
    torch.testing.assert_close(got.double(), rope_by_hand(x, positions, 500000.0), rtol=1e-4, atol=1e-4)
    # a rotation: norms kept, and position 0 is the identity
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(got[:, :, 0], x[:, :, 0])


def embed_by_hand(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if ids.dim() == 2:
        ids = ids.unsqueeze(-1)
    b, s, c = ids.shape
    out = torch.zeros(b, s, weight.shape[1], dtype=torch.float64)
    for i in range(b):
        for j in range(s):
            row = ids[i, j].tolist()
            if any(v != PAD for v in row[1:]):  # audio: sum of every non-pad column
                for v in row:
                    if v != PAD:
                        out[i, j] += weight[v].double()
            elif row[0] != PAD:  # text: column 0
                out[i, j] = weight[row[0]].double()
    return out


def test_embedding_rules():
    model = make_model()
    w = model.embed.weight
    ids = torch.tensor([[
        [5, PAD, PAD, PAD],  # text row
        [PAD, PAD, PAD, PAD],  # pad row
        [310, 330, PAD, PAD],  # audio row: q0 + q1
        [310, 330, 350, 370],  # audio row, 4 layers
        [PAD, 331, PAD, PAD],  # audio with column 0 pad
        [299, PAD, PAD, 377],  # marker-like text id with audio further right -> audio sum
    ]])
    got = model.embed_ids(ids)
    torch.testing.assert_close(got.double(), embed_by_hand(w, ids))
    torch.testing.assert_close(got[0, 0], w[5])
    assert got[0, 1].abs().max() == 0
    torch.testing.assert_close(got[0, 2], w[310] + w[330])
    # one column, [B, S] and [B, S, 1] alike; pads are zero
    flat = torch.tensor([[3, PAD, 320], [PAD, 7, 8]])
    torch.testing.assert_close(model.embed_ids(flat), model.embed_ids(flat.unsqueeze(-1)))
    torch.testing.assert_close(model.embed_ids(flat).double(), embed_by_hand(w, flat))


@pytest.mark.parametrize("double", [True, False])
def test_swiglu_fc1_bias(double):
    cfg = TransformerConfig(**{**CFG.to_dict(), "double_fc1_bias": double})
    mlp = make_model(cfg).layers[0].mlp
    x = torch.randn(2, 3, cfg.hidden_size)
    g, u, d = mlp.w_gate, mlp.w_up, mlp.w_down
    k = 2 if double else 1
    gate = x @ g.weight.T + k * g.bias
    up = x @ u.weight.T + k * u.bias
    want = (gate * torch.sigmoid(gate) * up) @ d.weight.T + d.bias
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)


def attention_by_hand(attn, x, positions, key_mask=None, causal=False):
    """Per-head loop: head h reads KV group h // (heads / kv_heads)."""
    b, s, _ = x.shape
    H, G, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.wq.weight.T + attn.wq.bias).view(b, s, H, D).transpose(1, 2)
    k = (x @ attn.wk.weight.T + attn.wk.bias).view(b, s, G, D).transpose(1, 2)
    v = (x @ attn.wv.weight.T + attn.wv.bias).view(b, s, G, D).transpose(1, 2)
    q = rope_by_hand(q, positions, CFG.rope_base)
    k = rope_by_hand(k, positions, CFG.rope_base)
    v = v.double()
    heads = []
    for h in range(H):
        g = h // (H // G)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(D)  # [b, s, s]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        if causal:
            scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, g])
    y = torch.stack(heads, 1).transpose(1, 2).reshape(b, s, H * D)
    return y @ attn.wo.weight.T.double() + attn.wo.bias.double()


def test_gqa_attention_per_head():
    model = make_model()
    attn = model.layers[0].attn
    x = torch.randn(2, 9, CFG.hidden_size)
    cos, sin = rope_angles(torch.arange(9), CFG.head_dim, CFG.rope_base)
    pos = list(range(9))
    # non-causal, no mask
    torch.testing.assert_close(attn(x, cos, sin).double(), attention_by_hand(attn, x, pos),
                               rtol=1e-4, atol=1e-4)
    # non-causal with key padding, in query blocks of 2 (block size must not matter)
    key_mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    want = attention_by_hand(attn, x, pos, key_mask=key_mask)
    for block in (None, 2, 4):
        got = attn(x, cos, sin, mask=key_mask[:, None, None, :], q_block=block)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # causal
    torch.testing.assert_close(attn(x, cos, sin, causal=True).double(),
                               attention_by_hand(attn, x, pos, causal=True), rtol=1e-4, atol=1e-4)


def forward_by_hand(model: Transformer, ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Embedding -> pre-norm residual blocks -> norm -> full logits, from the pieces above."""
    x = embed_by_hand(model.embed.weight, ids).float()
    pos = list(range(ids.shape[1]))
    for layer in model.layers:
        x = x + attention_by_hand(layer.attn, layer.attn_norm(x), pos, causal=causal).float()
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.norm(x) @ model.output.weight.T


def test_full_forward_wiring():
    model = make_model()
    ids = torch.randint(0, 400, (2, 7))
    with torch.no_grad():
        for causal in (True, False):
            torch.testing.assert_close(model(ids, causal=causal), forward_by_hand(model, ids, causal),
                                       rtol=1e-3, atol=1e-3)
        # the window projection is a slice of the full logits
        h = model.full_hidden(ids)
        torch.testing.assert_close(model.project(h, slice(300, 316)), model(ids, causal=False)[..., 300:316])


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_decode_matches_recompute(batch):
    model = make_model()
    torch.manual_seed(1)
    prompt_len, steps = 5, 12
    seq = torch.randint(0, 400, (batch, prompt_len + steps))
    with torch.no_grad():
        model.setup_cache(batch, 40)
        if batch == 1:  # the positions' mask over the whole cache
            logits = model(seq[:, :prompt_len], torch.arange(prompt_len))
        else:  # a prefill as plain causal attention over exactly its own keys
            h = model.decode_hidden(seq[:, :prompt_len], torch.arange(prompt_len), prompt_len, masked=False)
            logits = model.project(h)
        full = model(seq[:, :prompt_len])
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
        for t in range(prompt_len, prompt_len + steps):
            # keys read up to a bucket past the position (masked), or exactly (no mask)
            if t % 2:
                h = model.decode_hidden(seq[:, t : t + 1], torch.tensor([t]), kv_len=min(40, t + 1 + t % 3))
            else:
                h = model.decode_hidden(seq[:, t : t + 1], torch.tensor([t]), kv_len=t + 1, masked=False)
            step_logits = model.project(h)[:, -1]
            full = model(seq[:, : t + 1])[:, -1]
            torch.testing.assert_close(step_logits, full, rtol=1e-4, atol=1e-4)
        model.clear_cache()


def test_cache_row_copy_equals_batched_prefill():
    model = make_model()
    prompt = torch.randint(0, 400, (1, 6))
    with torch.no_grad():
        model.setup_cache(3, 16)
        model.decode_hidden(prompt.expand(3, -1), torch.arange(6))
        ref = [layer.attn.cache.k[:, :, :6].clone() for layer in model.layers]
        model.setup_cache(3, 16)
        model.decode_hidden(prompt, torch.arange(6))  # row 0 only
        model.copy_cache_row(0, 6)
        for layer, k in zip(model.layers, ref, strict=True):
            torch.testing.assert_close(layer.attn.cache.k[:, :, :6], k)
        model.clear_cache()


def test_blocked_attention_bounds_memory_and_is_exact(monkeypatch):
    from khala_cli.engine import transformer as tr

    model = make_model()
    x = torch.randn(1, 33, CFG.hidden_size)
    with torch.no_grad():
        a = model.full_hidden(x, q_block=None)
    # every attention call of the blocked pass scores at most 5 queries against all keys:
    # the S x S scores of all heads never exist at once
    real, shapes = tr.F.scaled_dot_product_attention, []

    def spy(q, k, v, **kw):
        shapes.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(tr.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        b = model.full_hidden(x, q_block=5)
    torch.testing.assert_close(a, b)
    assert shapes and max(q for q, _ in shapes) == 5 and all(k == 33 for _, k in shapes)
    assert len(shapes) == CFG.num_layers * 7  # ceil(33 / 5) blocks per layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_full_attention_matches_cpu():
    model = make_model()
    ids = torch.randint(0, 400, (2, 20))
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[1, 15:] = False
    with torch.no_grad():
        cpu = model.full_hidden(ids, key_mask)
        gpu = model.cuda().full_hidden(ids.cuda(), key_mask.cuda(), q_block=7).cpu()
    torch.testing.assert_close(cpu[key_mask], gpu[key_mask], rtol=1e-3, atol=1e-3)


# ---- the eager decode step ---------------------------------------------------------

WIDE = TransformerConfig(  # rows enough for row_linear to split its products over threads
    vocab_size=400, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
    ffn_hidden_size=384, norm_eps=1e-6, rope_base=10000.0, max_seq_len=64,
)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_row_linear_gives_each_row_its_own_numbers_whatever_the_batch(threads):
    """Each row of a row product is the row alone, bit for bit, at every row count and
    position (F.linear's rows are not: its one-, few- and many-row kernels round apart)."""
    gen = torch.Generator().manual_seed(0)
    for n, k in [(128, 64), (384, 128), (1025, 512), (1408, 512), (512, 1408), (130, 64)]:
        w = torch.randn(n, k, generator=gen) * 0.05
        for b in (torch.randn(n, generator=gen), None):
            rows = torch.randn(40, 1, k, generator=gen)
            alone = [row_linear(rows[i : i + 1], w, b) for i in range(len(rows))]
            for m in (2, 3, 5, 8, 9, 16, 17, 40):
                got = row_linear(rows[:m], w, b)
                assert all(torch.equal(got[i], alone[i][0]) for i in range(m)), (n, k, m)
                torch.testing.assert_close(got, torch.nn.functional.linear(rows[:m], w, b))
            flat = row_linear(rows[3:8, 0], w, b)  # [B, in] as [B, 1, in]
            assert all(torch.equal(flat[i], alone[3 + i][0, 0]) for i in range(5))
    x = torch.randn(ROW_MAX + 1, 1, 64, generator=gen)  # a prefill's rows: F.linear itself
    w = torch.randn(32, 64, generator=gen)
    assert torch.equal(row_linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("batch", [1, 3])
def test_step_hidden_equals_unmasked_decode_hidden(threads, batch):
    """The eager step is the unmasked one-token decode_hidden, bit for bit, caches included."""
    plain, lean = make_model(WIDE), make_model(WIDE)
    torch.manual_seed(2)
    seq = torch.randint(0, 400, (batch, 20))
    with torch.inference_mode():
        for m in (plain, lean):
            m.setup_cache(batch, 40)
            m.decode_hidden(seq[:, :5], torch.arange(5), 5, masked=False)
        for t in range(5, 20):
            want = plain.decode_hidden(seq[:, t : t + 1], torch.tensor([t]), t + 1, masked=False)
            assert torch.equal(lean.step_hidden(seq[:, t], t), want[:, -1])
        for a, b in zip(plain.layers, lean.layers, strict=True):
            assert torch.equal(a.attn.cache.k, b.attn.cache.k)
            assert torch.equal(a.attn.cache.v, b.attn.cache.v)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_a_step_over_several_songs_caches_gives_each_song_its_lone_numbers(threads):
    """Rows of two songs (prompts of 4 and 9 tokens, caches of their own lengths) step
    together; each row's hidden state and keys are those of its song stepping alone."""
    model = make_model(WIDE)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 400, (1, 4)), torch.randint(0, 400, (1, 9))]
    rows, lengths = [2, 1], [30, 24]
    feed = torch.randint(0, 400, (3, 8))
    with torch.inference_mode():
        alone = []
        for prompt, n, length, ids in zip(prompts, rows, lengths, (feed[:2], feed[2:]),
                                          strict=True):
            p = prompt.shape[1]
            model.setup_cache(n, length)
            model.decode_hidden(prompt.expand(n, -1), torch.arange(p), p, masked=False)
            alone.append(torch.stack([model.step_hidden(ids[:, t], p + t) for t in range(8)]))
            alone.append([layer.attn.cache.k.clone() for layer in model.layers])
        model.setup_caches(list(zip(rows, lengths, strict=True)))
        for c, prompt in enumerate(prompts):
            p = prompt.shape[1]
            model.decode_hidden(prompt, torch.arange(p), p, masked=False, cache=c)
            model.copy_cache_row(0, p, cache=c)
        together = torch.stack([model.step_hidden(feed[:, t], [Span(0, 2, 4 + t), Span(1, 1, 9 + t)])
                                for t in range(8)])
        assert torch.equal(together[:, :2], alone[0]) and torch.equal(together[:, 2:], alone[2])
        for layer, ka, kb in zip(model.layers, alone[1], alone[3], strict=True):
            assert torch.equal(layer.attn.caches[0].k, ka)
            assert torch.equal(layer.attn.caches[1].k, kb)
        model.clear_cache()
