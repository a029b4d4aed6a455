"""The one transformer shared by the backbone and the super-res model.

Pre-norm GPT: multi-codebook embedding -> N x (RMSNorm, GQA attention with rotate-half RoPE,
RMSNorm, SwiGLU with the trained model's double fc1 bias) -> final RMSNorm -> untied output.
Tensor names are the contract in docs/DESIGN.md.

Two ways to run it:
- causal decode against a static, preallocated KV cache (`setup_cache`, `decode_hidden`):
  a prefill, then one token per step; keys are read up to a host-known `kv_len` only;
- full (non-causal) attention over [B, S, C] rows with a key-padding mask (`full_hidden`),
  evaluated in query blocks so the S x S scores of all heads are never held at once.

Both return the final hidden states (after the final norm); callers project them onto the
output rows they need (`project`), never the full vocabulary unless they ask for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from khala_cli.engine.config import TransformerConfig
from khala_cli.engine.tokens import PAD

# Elements of one query block's attention scores [B, heads, block, S]: bounds the peak memory
# of the non-causal pass. On CUDA the fused kernels hold no scores at all; the bound only
# matters if SDPA falls back to its math kernel.
SCORE_BUDGET_CPU = 1 << 25
SCORE_BUDGET_CUDA = 1 << 30


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics, scaling and the weight product in fp32; one rounding at the end.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin of the rotary angles, fp32, [len(positions), head_dim // 2]."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (first half pairs with second half), in fp32. x: [B, H, S, D]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


# Row products. A decode step's products have a few rows (one per batch row), and how a BLAS
# rounds one row depends on how many rows share the product: MKL's one-row product (a matrix-
# vector kernel), its two- and three-row products and its full tiles (split over threads) each
# round differently. oneDNN's matmul rounds every row of a product of 2..8 rows (more for some
# shapes) the same way, wherever the row sits and whatever the thread count. So on the CPU in
# fp32 a step's rows go through oneDNN, a single row padded with a zero row to two, and a row
# count whose rows are not each equal to that two-row product (checked once per shape) is split
# in halves: a row's numbers never depend on its batch-mates.
ROW_MAX = 64  # a decode step's batch; longer inputs (prefill) go through F.linear
ROW_CHUNK = 16  # the most rows of one product (more are split in halves)
_ROWS_OK: dict[tuple, bool] = {}  # (rows, weight shape, has bias, threads) -> rows equal alone


def row_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear(x, w, b) for x of a few rows, [B, 1, in] or [B, in], B <= ROW_MAX, each row
    computed the same way whatever B is and wherever the row sits (on the CPU in fp32; on
    other devices and dtypes, and inside a compiled step, it is F.linear)."""
    rows = x.numel() // max(1, w.shape[1])
    if (torch.compiler.is_compiling() or not _ONEDNN or x.dim() < 2 or not x.is_cpu
            or x.dtype != torch.float32 or w.dtype != x.dtype or rows > ROW_MAX):
        return F.linear(x, w, b)
    y = _rows(x.reshape(rows, -1).contiguous(), w, b)
    return y.view(*x.shape[:-1], w.shape[0])


def _onednn_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")


def _rows(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    m = x.shape[0]
    if m == 1:
        return _onednn_linear(F.pad(x, (0, 0, 0, 1)), w, b)[:1]
    if m <= ROW_CHUNK and _rows_equal_alone(m, w, b):
        return _onednn_linear(x, w, b)
    half = m // 2
    return torch.cat([_rows(x[:half], w, b), _rows(x[half:], w, b)])


def _rows_equal_alone(m: int, w: Tensor, b: Tensor | None) -> bool:
    """Whether every row of an m-row product equals the row alone (padded to two rows), bit
    for bit, on a random input: checked once per shape and thread count."""
    key = (m, tuple(w.shape), b is not None, torch.get_num_threads())
    if key not in _ROWS_OK:
        x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m)).to(w.dtype)
        y = _onednn_linear(x, w, b)
        _ROWS_OK[key] = all(torch.equal(y[i], _rows(x[i : i + 1], w, b)[0]) for i in range(m))
    return _ROWS_OK[key]


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_available()


class KVCache:
    """Static cache of one layer: [B, kv_heads, max_len, head_dim] keys and values."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int,
               row: int = 0) -> tuple[Tensor, Tensor]:
        """Write k, v [b, kv_heads, S, head_dim] into rows row..row+b-1 at input_pos ([S],
        or [b, S]: each row its own positions); their keys and values up to kv_len."""
        b = k.shape[0]
        ck, cv = self.k[row : row + b], self.v[row : row + b]
        if input_pos.dim() == 1:
            ck.index_copy_(2, input_pos, k)
            cv.index_copy_(2, input_pos, v)
        else:
            at = input_pos[:, None, :, None].expand_as(k)
            ck.scatter_(2, at, k)
            cv.scatter_(2, at, v)
        return ck[:, :, :kv_len], cv[:, :, :kv_len]


@dataclass(frozen=True)
class Span:
    """Consecutive rows of a decode step that share one KV cache (one song) and one position:
    rows row..row+rows-1 of cache `cache`, their token going in at `pos`."""

    cache: int
    rows: int
    pos: int
    row: int = 0


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.wq = nn.Linear(c.hidden_size, c.num_heads * c.head_dim)
        self.wk = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.wv = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.wo = nn.Linear(c.num_heads * c.head_dim, c.hidden_size)
        self.caches: list[KVCache] = []  # one per song of a decode (setup_caches)

    @property
    def cache(self) -> KVCache | None:
        return self.caches[0] if self.caches else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        input_pos: Tensor | None = None,
        kv_len: int | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        q_block: int | None = None,
        cache: int = 0,
        row: int = 0,
    ) -> Tensor:
        b, s, _ = x.shape
        lin = row_linear if input_pos is not None and s == 1 else F.linear
        q = lin(x, self.wq.weight, self.wq.bias).view(b, s, self.num_heads, self.head_dim)
        k = lin(x, self.wk.weight, self.wk.bias).view(b, s, self.num_kv_heads, self.head_dim)
        v = lin(x, self.wv.weight, self.wv.bias).view(b, s, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if input_pos is not None:  # cached causal decode; `mask`: [1 or B, 1, s, kv_len] or None
            assert self.caches, "call setup_cache() first"
            k, v = self.caches[cache].update(input_pos, k, v, kv_len, row)
            if s == 1:
                y = one_query_attention(q, k, v, mask)
            else:  # without a mask: a prefill from position 0 (kv_len == s), plain causal
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                   enable_gqa=True)
        elif causal:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = _blocked_attention(q, k, v, mask, q_block)
        return lin(y.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim),
                   self.wo.weight, self.wo.bias)

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, spans: Sequence[Span]) -> Tensor:
        """The cached decode of one token per row, each span of rows reading its own cache's
        keys 0..pos: per span forward(x, input_pos=[pos], kv_len=pos + 1) without a mask,
        with the same arithmetic. Spans may be successive positions of one cache row (a
        replay of known tokens): each is a row of the products and a query of its own. x: [B, 1, hidden]; cos, sin: [1, head_dim // 2], or
        [B, 1, 1, head_dim // 2] (each row its own position)."""
        b, d, g = x.shape[0], self.head_dim, self.num_kv_heads
        q = row_linear(x, self.wq.weight, self.wq.bias).view(b, self.num_heads, 1, d)
        k = row_linear(x, self.wk.weight, self.wk.bias).view(b, g, 1, d)
        v = row_linear(x, self.wv.weight, self.wv.bias).view(b, g, 1, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ys, r = [], 0
        for sp in spans:  # in order: a span reads the keys that the spans before it wrote
            cache, n, pos, at = self.caches[sp.cache], sp.rows, sp.pos, sp.row
            cache.k[at : at + n, :, pos : pos + 1] = k[r : r + n]
            cache.v[at : at + n, :, pos : pos + 1] = v[r : r + n]
            ys.append(one_query_attention(q[r : r + n], cache.k[at : at + n, :, : pos + 1],
                                          cache.v[at : at + n, :, : pos + 1]))
            r += n
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return row_linear(y.view(b, 1, -1), self.wo.weight, self.wo.bias)


def one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention of one query per head: q [B, heads, 1, D] over k, v [B, kv_heads, L, D]
    (mask None, or [1 or B, 1, 1, L]). Each KV group's query heads are folded into the query
    axis (head h = g * rep + r reads group g): one SDPA over kv_heads, no K/V copy. On the
    CPU the kernel splits its work by batch size and thread count, and rounds a row with it:
    there each row gets the call it would get alone."""
    b, h, _, d = q.shape
    g = k.shape[1]
    qf = q.reshape(b, g, h // g, d)
    if not q.is_cpu or b == 1:
        y = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask)
    else:
        y = torch.cat([F.scaled_dot_product_attention(
            qf[i : i + 1], k[i : i + 1], v[i : i + 1],
            attn_mask=None if mask is None else mask[i : i + 1] if mask.shape[0] > 1 else mask)
            for i in range(b)])
    return y.view(b, h, 1, d)


def _blocked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_block: int | None) -> Tensor:
    """Exact non-causal attention over query blocks. mask: [B, 1, 1, S] bool (True = attend)."""
    b, h, s, _ = q.shape
    gqa = True
    if q.is_cuda:
        # The memory-efficient kernel takes a mask but not grouped K/V: expand K/V (cheap,
        # S x heads x head_dim) rather than fall back to the math kernel.
        rep = h // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    if q_block is None:
        budget = SCORE_BUDGET_CUDA if q.is_cuda else SCORE_BUDGET_CPU
        q_block = max(16, budget // max(1, b * h * k.shape[2]))
    if q_block >= s:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    out = torch.empty_like(q)
    for i in range(0, s, q_block):
        out[:, :, i : i + q_block] = F.scaled_dot_product_attention(
            q[:, :, i : i + q_block], k, v, attn_mask=mask, enable_gqa=gqa
        )
    return out


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(config.hidden_size, config.ffn_hidden_size)
        self.w_up = nn.Linear(config.hidden_size, config.ffn_hidden_size)
        self.w_down = nn.Linear(config.ffn_hidden_size, config.hidden_size)
        self.double_bias = config.double_fc1_bias

    def forward(self, x: Tensor, linear: Callable[..., Tensor] = F.linear) -> Tensor:
        """linear: F.linear, or row_linear for a decode step's few rows (the same numbers)."""
        gate = linear(x, self.w_gate.weight, self.w_gate.bias)
        up = linear(x, self.w_up.weight, self.w_up.bias)
        if self.double_bias:  # the trained model's fused bias-SwiGLU adds the fc1 bias again
            gate = gate + self.w_gate.bias
            up = up + self.w_up.bias
        return linear(F.silu(gate) * up, self.w_down.weight, self.w_down.bias)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, **attn_kwargs) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, **attn_kwargs)
        one_token = attn_kwargs.get("input_pos") is not None and x.shape[1] == 1
        return x + self.mlp(self.mlp_norm(x), linear=row_linear if one_token else F.linear)

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, spans: Sequence[Span]) -> Tensor:
        x = x + self.attn.step(self.attn_norm(x), cos, sin, spans)
        return x + self.mlp(self.mlp_norm(x), linear=row_linear)


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rope: tuple[Tensor, Tensor] | None = None  # fp32 cos/sin table, grown on demand
        self.cache_batch = 0
        self.cache_len = 0

    # ---- embedding ------------------------------------------------------------------
    def embed_ids(self, ids: Tensor) -> Tensor:
        """[B, S] or [B, S, C] ids (PAD = -1) -> [B, S, hidden] in the weights' dtype.

        A row with any non-pad column >= 1 is audio: the sum of its non-pad columns'
        embeddings. Otherwise its columns >= 1 are all pad, and the same sum is the
        embedding of column 0 (zero when column 0 is pad too). Summed in fp32.
        """
        if ids.dim() == 2:
            ids = ids.unsqueeze(-1)
        acc = None
        for c in range(ids.shape[-1]):
            acc = self.add_column(acc, ids[..., c])
        return acc.to(self.embed.weight.dtype)

    def add_column(self, acc: Tensor | None, col: Tensor) -> Tensor:
        """acc (fp32 [B, S, hidden] or None) + embedding of one id column (pads add zero)."""
        keep = col != PAD
        e = self.embed(torch.where(keep, col, 0)).float() * keep.unsqueeze(-1)
        return e if acc is None else acc + e

    # ---- rotary table ---------------------------------------------------------------
    def _rope_table(self, length: int, device) -> tuple[Tensor, Tensor]:
        if self._rope is None or self._rope[0].shape[0] < length or self._rope[0].device != device:
            pos = torch.arange(max(length, 1), device=device)
            self._rope = rope_angles(pos, self.config.head_dim, self.config.rope_base)
        return self._rope

    # ---- KV cache -------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_seq_len: int, *, device=None, dtype=None) -> None:
        """Preallocate every layer's [B, kv_heads, max_seq_len, head_dim] cache."""
        self.setup_caches([(batch_size, max_seq_len)], device=device, dtype=dtype)

    def setup_caches(self, shapes: Sequence[tuple[int, int]], *, device=None, dtype=None) -> None:
        """Preallocate every layer's caches, one per (rows, length): each song of a batch
        gets the cache it would get alone."""
        w = self.embed.weight
        device, dtype = device or w.device, dtype or w.dtype
        c = self.config
        for layer in self.layers:
            layer.attn.caches = [KVCache(b, c.num_kv_heads, n, c.head_dim, device, dtype)
                                 for b, n in shapes]
        self.cache_batch = sum(b for b, _ in shapes)
        self.cache_len = max(n for _, n in shapes)
        self._rope_table(self.cache_len, device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attn.caches = []
        self.cache_batch = self.cache_len = 0

    def copy_cache_row(self, src: int = 0, length: int | None = None, *, cache: int = 0,
                       dst: int | None = None) -> None:
        """Copy row `src` of cache `cache` (its first `length` positions) into row `dst`, or
        into every other row."""
        for layer in self.layers:
            c = layer.attn.caches[cache]
            n = c.k.shape[2] if length is None else length
            for t in (c.k, c.v):
                if dst is None:
                    t[:, :, :n] = t[src : src + 1, :, :n]
                else:
                    t[dst, :, :n] = t[src, :, :n]

    # ---- forward passes -------------------------------------------------------------
    def _inputs(self, x: Tensor) -> Tensor:
        return x if x.is_floating_point() else self.embed_ids(x)

    def decode_hidden(
        self, x: Tensor, input_pos: Tensor, kv_len: int | None = None, *, masked: bool = True,
        cache: int = 0, row: int = 0,
    ) -> Tensor:
        """Causal pass through the KV cache. x: ids [B, S] (or embeddings), B <= cache batch;
        input_pos: [S] absolute positions (device tensor), or [B, S]: each row its own;
        kv_len: keys read (host int, > max(input_pos)), default the whole cache.
        masked=False skips the mask built from the positions: allowed for one query at
        position kv_len - 1 (it sees every key read), or for a prefill at positions 0..S-1
        with kv_len == S (plain causal attention). cache, row: the rows written are rows
        row..row+B-1 of that cache. Returns normed hidden [B, S, hidden]."""
        kv_len = self.cache_len if kv_len is None else kv_len
        if not masked and x.shape[1] > 1 and kv_len != x.shape[1]:
            raise ValueError("an unmasked multi-token pass must be a prefill with kv_len == S")
        h = self._inputs(x)
        cos_t, sin_t = self._rope_table(self.cache_len, h.device)
        cos, sin = cos_t[input_pos], sin_t[input_pos]
        if input_pos.dim() == 2:  # [B, S, D/2] -> [B, 1, S, D/2], beside the heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = None
        if masked:
            key_pos = torch.arange(kv_len, device=h.device)
            mask = key_pos <= input_pos[..., None]  # [S, kv_len] or [B, S, kv_len]
            mask = mask[None, None] if input_pos.dim() == 1 else mask[:, None]
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos=input_pos, kv_len=kv_len, mask=mask, cache=cache,
                      row=row)
        return self.norm(h)

    def step_hidden(self, ids: Tensor, pos: int | Sequence[Span]) -> Tensor:
        """decode_hidden(ids[:, None], [pos], pos + 1, masked=False)[:, -1], bit for bit,
        with less work per step: one id per row (ids: [B], never PAD) at a host position.
        pos: one position for all rows (cache 0), or spans of rows, each with its own cache
        and position (the rows of several songs). Returns normed hidden [B, hidden]."""
        spans = [Span(0, ids.shape[0], pos)] if isinstance(pos, int) else list(pos)
        x = self.embed(ids)[:, None]  # embed_ids of a single non-pad column, exactly
        cos_t, sin_t = self._rope_table(self.cache_len, x.device)
        if len(spans) == 1:
            p = spans[0].pos
            cos, sin = cos_t[p : p + 1], sin_t[p : p + 1]
        else:
            at = torch.tensor([sp.pos for sp in spans for _ in range(sp.rows)], device=x.device)
            cos, sin = cos_t[at][:, None, None], sin_t[at][:, None, None]
        for layer in self.layers:
            x = layer.step(x, cos, sin, spans)
        return self.norm(x[:, 0])

    def full_hidden(
        self,
        x: Tensor,
        key_mask: Tensor | None = None,
        *,
        causal: bool = False,
        q_block: int | None = None,
    ) -> Tensor:
        """Pass over whole rows, positions 0..S-1, no cache. x: ids [B, S] / [B, S, C] or
        embeddings [B, S, hidden]; key_mask: [B, S] bool, True = a real row (keys elsewhere
        are masked). Non-causal unless `causal`. Returns normed hidden [B, S, hidden]."""
        h = self._inputs(x)
        s = h.shape[1]
        cos_t, sin_t = self._rope_table(s, h.device)
        cos, sin = cos_t[:s], sin_t[:s]
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if causal and mask is not None:
            raise ValueError("causal passes take no key mask")
        for layer in self.layers:
            h = layer(h, cos, sin, mask=mask, causal=causal, q_block=q_block)
        return self.norm(h)

    def project(self, hidden: Tensor, rows: slice | Tensor | None = None) -> Tensor:
        """fp32 logits of `hidden` onto output rows (a slice, an index tensor, or all)."""
        w = self.output.weight
        if rows is not None:
            w = w[rows]
        return F.linear(hidden, w.to(hidden.dtype)).float()

    def forward(
        self,
        ids: Tensor,
        input_pos: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        causal: bool = True,
    ) -> Tensor:
        """Full-vocabulary fp32 logits (for tests and reference paths; generation projects
        onto the rows it samples from). With input_pos: cached decode; with key_mask: a
        non-causal pass; else a full pass, causal unless `causal=False`."""
        if input_pos is not None:
            h = self.decode_hidden(ids, input_pos)
        else:
            h = self.full_hidden(ids, key_mask, causal=causal and key_mask is None)
        return self.project(h)
