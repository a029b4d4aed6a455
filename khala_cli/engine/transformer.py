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

from collections.abc import Callable

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


# A product split across threads gives each chunk a multiple of this many output rows:
# BLAS kernels compute the rows in vector blocks and a partial block at the end of a chunk
# can round differently; tiny chunks also leave the BLAS for torch's own loop.
CHUNK_ROWS = 64
SPLIT_MAX_ROWS = 64  # a decode step's batch; longer inputs (prefill) thread well in F.linear
_ROW_CHUNKS: dict[tuple, int] = {}  # (x shape, weight shape, has bias, threads) -> chunks


def row_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear(x, w, b) for x of a few rows: [B, 1, in] or [B, in], B <= SPLIT_MAX_ROWS
    (F.linear of a 1-D x is a matrix-vector product that rounds differently, and stays one).

    On the CPU in fp32 the weight's output rows go in one chunk per thread through one
    batched product: MKL runs a product of a few rows on one core, which reads the weights
    at about half the machine's memory bandwidth, and the batched product spreads its chunks
    over the threads. Every output element is the same dot product as in F.linear, so the
    result is bit-identical; that is checked once per shape, and a shape that differs stays
    on F.linear."""
    if torch.compiler.is_compiling():  # a compiled step chooses its own kernels
        return F.linear(x, w, b)
    chunks = _row_chunks(x, w, b)
    return F.linear(x, w, b) if chunks == 1 else _split_linear(x, w, b, chunks)


def _split_linear(x: Tensor, w: Tensor, b: Tensor | None, chunks: int) -> Tensor:
    n, k = w.shape
    rows = x.numel() // k
    wt = w.view(chunks, n // chunks, k).transpose(1, 2)
    xs = x.reshape(1, rows, k).expand(chunks, rows, k)
    y = torch.bmm(xs, wt) if b is None else torch.baddbmm(b.reshape(chunks, 1, -1), xs, wt)
    return y.transpose(0, 1).reshape(*x.shape[:-1], n)  # [chunks, rows, n / chunks] -> rows


def _row_chunks(x: Tensor, w: Tensor, b: Tensor | None) -> int:
    if (x.dim() < 2 or x.shape[-1] != w.shape[1] or x.numel() > SPLIT_MAX_ROWS * w.shape[1]
            or not x.is_cpu or x.dtype != torch.float32 or w.dtype != x.dtype
            or not w.is_contiguous()):
        return 1
    key = (tuple(x.shape), tuple(w.shape), b is not None, torch.get_num_threads())
    if key not in _ROW_CHUNKS:
        _ROW_CHUNKS[key] = _checked_chunks(x.shape, w, b, key[3])
    return _ROW_CHUNKS[key]


def _checked_chunks(shape: torch.Size, w: Tensor, b: Tensor | None, threads: int) -> int:
    """The most chunks (<= threads, of a multiple of CHUNK_ROWS rows each) whose split
    product equals F.linear bit for bit on a few random inputs of x's shape; 1 if none."""
    n, _ = w.shape
    chunks = next((c for c in range(min(threads, n // CHUNK_ROWS), 1, -1)
                   if n % (c * CHUNK_ROWS) == 0), 1)
    test = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0)).to(w.dtype)
    for x in test if chunks > 1 else ():
        if not torch.equal(_split_linear(x, w, b, chunks), F.linear(x, w, b)):
            return 1
    return chunks


class KVCache:
    """Static cache of one layer: [B, kv_heads, max_len, head_dim] keys and values."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        b = k.shape[0]
        self.k[:b].index_copy_(2, input_pos, k)
        self.v[:b].index_copy_(2, input_pos, v)
        return self.k[:b, :, :kv_len], self.v[:b, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.wq = nn.Linear(c.hidden_size, c.num_heads * c.head_dim)
        self.wk = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.wv = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.wo = nn.Linear(c.num_heads * c.head_dim, c.hidden_size)
        self.cache: KVCache | None = None

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
    ) -> Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if input_pos is not None:  # cached causal decode; `mask`: [1, 1, s, kv_len] or None
            assert self.cache is not None, "call setup_cache() first"
            k, v = self.cache.update(input_pos, k, v, kv_len)
            if s == 1:
                # One query per head: fold each KV group's query heads into the query axis
                # (head h = g * rep + r reads group g), one SDPA over kv_heads, no K/V copy.
                g = self.num_kv_heads
                y = F.scaled_dot_product_attention(q.reshape(b, g, -1, self.head_dim), k, v,
                                                   attn_mask=mask)
                y = y.view(b, self.num_heads, 1, self.head_dim)
            else:  # without a mask: a prefill from position 0 (kv_len == s), plain causal
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                   enable_gqa=True)
        elif causal:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = _blocked_attention(q, k, v, mask, q_block)
        return self.wo(y.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, pos: int) -> Tensor:
        """The cached decode of one token per row at host position `pos`, reading keys
        0..pos: forward(x, input_pos=[pos], kv_len=pos + 1) without a mask, with the same
        arithmetic. x: [B, 1, hidden]; cos, sin: [1, head_dim // 2]."""
        b, d, g = x.shape[0], self.head_dim, self.num_kv_heads
        q = row_linear(x, self.wq.weight, self.wq.bias).view(b, self.num_heads, 1, d)
        k = row_linear(x, self.wk.weight, self.wk.bias).view(b, g, 1, d)
        v = row_linear(x, self.wv.weight, self.wv.bias).view(b, g, 1, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = self.cache
        cache.k[:b, :, pos : pos + 1] = k
        cache.v[:b, :, pos : pos + 1] = v
        y = F.scaled_dot_product_attention(q.view(b, g, -1, d), cache.k[:b, :, : pos + 1],
                                           cache.v[:b, :, : pos + 1])
        return row_linear(y.view(b, 1, -1), self.wo.weight, self.wo.bias)


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
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x: Tensor, cos: Tensor, sin: Tensor, pos: int) -> Tensor:
        x = x + self.attn.step(self.attn_norm(x), cos, sin, pos)
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
        w = self.embed.weight
        device, dtype = device or w.device, dtype or w.dtype
        c = self.config
        for layer in self.layers:
            layer.attn.cache = KVCache(batch_size, c.num_kv_heads, max_seq_len, c.head_dim, device, dtype)
        self.cache_batch, self.cache_len = batch_size, max_seq_len
        self._rope_table(max_seq_len, device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attn.cache = None
        self.cache_batch = self.cache_len = 0

    def copy_cache_row(self, src: int = 0, length: int | None = None) -> None:
        """Copy cache row `src` (its first `length` positions) into every other row."""
        n = self.cache_len if length is None else length
        for layer in self.layers:
            cache = layer.attn.cache
            for t in (cache.k, cache.v):
                t[:, :, :n] = t[src : src + 1, :, :n]

    # ---- forward passes -------------------------------------------------------------
    def _inputs(self, x: Tensor) -> Tensor:
        return x if x.is_floating_point() else self.embed_ids(x)

    def decode_hidden(
        self, x: Tensor, input_pos: Tensor, kv_len: int | None = None, *, masked: bool = True
    ) -> Tensor:
        """Causal pass through the KV cache. x: ids [B, S] (or embeddings), B <= cache batch;
        input_pos: [S] absolute positions (device tensor); kv_len: keys read (host int,
        > max(input_pos)), default the whole cache. masked=False skips the mask built from
        the positions: allowed for one query at position kv_len - 1 (it sees every key
        read), or for a prefill at positions 0..S-1 with kv_len == S (plain causal
        attention). Returns normed hidden [B, S, hidden]."""
        kv_len = self.cache_len if kv_len is None else kv_len
        if not masked and x.shape[1] > 1 and kv_len != x.shape[1]:
            raise ValueError("an unmasked multi-token pass must be a prefill with kv_len == S")
        h = self._inputs(x)
        cos_t, sin_t = self._rope_table(self.cache_len, h.device)
        cos, sin = cos_t[input_pos], sin_t[input_pos]
        mask = None
        if masked:
            key_pos = torch.arange(kv_len, device=h.device)
            mask = (key_pos[None, :] <= input_pos[:, None])[None, None]
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos=input_pos, kv_len=kv_len, mask=mask)
        return self.norm(h)

    def step_hidden(self, ids: Tensor, pos: int) -> Tensor:
        """decode_hidden(ids[:, None], [pos], pos + 1, masked=False)[:, -1], bit for bit,
        with less work per step: one id per row (ids: [B], never PAD) at a host position.
        Returns normed hidden [B, hidden]."""
        x = self.embed(ids)[:, None]  # embed_ids of a single non-pad column, exactly
        cos_t, sin_t = self._rope_table(self.cache_len, x.device)
        cos, sin = cos_t[pos : pos + 1], sin_t[pos : pos + 1]
        for layer in self.layers:
            x = layer.step(x, cos, sin, pos)
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
