"""Super-resolution passes: count, markers, inputs, window projection, padding invariance."""

from __future__ import annotations

import numpy as np
import torch

from khala_cli.engine import superres
from khala_cli.engine.config import TransformerConfig
from khala_cli.engine.tokens import PAD, TokenLayout
from khala_cli.engine.transformer import Transformer

LAYOUT = TokenLayout(audio_offset=300, codebook_size=16, num_quantizers=6, bos_id=1,
                     end_of_song_id=2, no_use_id=4)
CFG = TransformerConfig(vocab_size=LAYOUT.superres_vocab, hidden_size=32, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, ffn_hidden_size=48,
                        max_seq_len=256)
PROMPT = [1, 17, 42, 99, 251]


def make_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        model.output.weight.mul_(6.0)
    return model


def q01(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, LAYOUT.codebook_size, (2, frames))


def full_ids(codes: np.ndarray, upto: int) -> torch.Tensor:
    """The [1, S, upto] ids of pass `upto` (columns 0..upto-1), built from the result."""
    p, f = len(PROMPT), codes.shape[1]
    ids = torch.full((1, p + f, upto), PAD, dtype=torch.int64)
    ids[0, :p, 0] = torch.tensor(PROMPT)
    ids[0, p - 1, 0] = LAYOUT.marker_id(upto)
    for layer in range(upto):
        ids[0, p:, layer] = torch.from_numpy(codes[layer]) + LAYOUT.layer_start(layer)
    return ids


def test_passes_markers_inputs_and_window(monkeypatch):
    model = make_model()
    codes_in = [q01(9, 0), q01(9, 1)]
    seen_x, seen_rows = [], []
    full_hidden, project = model.full_hidden, model.project

    def spy_hidden(x, key_mask=None, **kw):
        seen_x.append(x.clone())
        return full_hidden(x, key_mask, **kw)

    def spy_project(hidden, rows=None):
        seen_rows.append((rows, hidden.shape))
        return project(hidden, rows)

    monkeypatch.setattr(model, "full_hidden", spy_hidden)
    monkeypatch.setattr(model, "project", spy_project)
    done = []
    out = superres.upsample(model, LAYOUT, PROMPT, codes_in, [5, 6],
                            progress=lambda d, t: done.append((d, t)))

    nq = LAYOUT.num_quantizers
    assert len(seen_x) == 2 * (nq - 2) == 8  # per layer one pass per seed, on its rows alone
    assert done == [(i, 4) for i in range(1, 5)]
    for i, layer in enumerate(range(2, nq)):
        start, end = LAYOUT.layer_range(layer)
        for b in range(2):
            rows, shape = seen_rows[2 * i + b]
            assert (rows.start, rows.stop) == (start, end)  # only this layer's window
            assert tuple(shape) == (1, 9, CFG.hidden_size)  # only the audio rows
            # the pass saw exactly columns 0..layer-1 of the result, marker on the last
            # prompt row
            want = model.embed_ids(full_ids(out[b], layer))[0]
            torch.testing.assert_close(seen_x[2 * i + b][0], want)
            torch.testing.assert_close(seen_x[2 * i + b][0, len(PROMPT) - 1],
                                       model.embed.weight[300 - 1 - layer])
    for b in range(2):
        assert out[b].shape == (nq, 9) and out[b].dtype == np.int64
        np.testing.assert_array_equal(out[b][:2], codes_in[b])
        assert out[b].min() >= 0 and out[b].max() < LAYOUT.codebook_size


def test_greedy_equals_argmax_of_full_vocab_window():
    """top_k=1: each pass is the argmax of the full-vocab logits' window, frame by frame."""
    model = make_model()
    (codes,) = superres.upsample(model, LAYOUT, PROMPT, [q01(7, 3)], [0], top_k=1)
    p = len(PROMPT)
    with torch.no_grad():
        for layer in range(2, LAYOUT.num_quantizers):
            logits = model(full_ids(codes, layer), causal=False)[0, p:]
            start, end = LAYOUT.layer_range(layer)
            np.testing.assert_array_equal(codes[layer], logits[:, start:end].argmax(-1).numpy())


def test_real_length_equals_padded_and_masked_reference():
    model = make_model()
    seeds = [21, 22, 23]
    codes_in = [q01(12, 0), q01(7, 1), q01(3, 2)]  # a batch with padding rows
    ours = superres.upsample(model, LAYOUT, PROMPT, codes_in, seeds)
    ref = superres.upsample_reference_padded(model, LAYOUT, PROMPT, codes_in, seeds, pad_to=64)
    for a, b, c in zip(ours, ref, codes_in, strict=True):
        assert a.shape == (LAYOUT.num_quantizers, c.shape[1])
        np.testing.assert_array_equal(a, b)
    # each seed alone gives its take from the batch
    for i in range(3):
        (alone,) = superres.upsample(model, LAYOUT, PROMPT, [codes_in[i]], [seeds[i]])
        np.testing.assert_array_equal(alone, ours[i])
    # and different seeds give different layers
    other = superres.upsample(model, LAYOUT, PROMPT, [codes_in[0]], [99])[0]
    assert not np.array_equal(other[2:], ours[0][2:])


def test_small_query_blocks_change_nothing():
    model = make_model()
    codes_in = [q01(20, 4), q01(11, 5)]
    a = superres.upsample(model, LAYOUT, PROMPT, codes_in, [1, 2])
    b = superres.upsample(model, LAYOUT, PROMPT, codes_in, [1, 2], q_block=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_rejects_bad_codes_and_handles_empty():
    model = make_model()
    bad = np.full((2, 3), LAYOUT.codebook_size)
    for arg in (bad, np.zeros((3, 3), dtype=np.int64)):
        try:
            superres.upsample(model, LAYOUT, PROMPT, [arg], [0])
        except ValueError:
            pass
        else:
            raise AssertionError("accepted bad q01 codes")
    (empty,) = superres.upsample(model, LAYOUT, PROMPT, [np.zeros((2, 0), dtype=np.int64)], [0])
    assert empty.shape == (LAYOUT.num_quantizers, 0)


def test_greedy_codes_follow_the_formula_written_out_by_hand():
    """Each pass L, written from the reference's formula alone: text rows embed their id,
    the last prompt row embeds the marker audio_offset-1-L, an audio row embeds the SUM of
    its layers 0..L-1 codes (id = audio_offset + l*codebook + code); full attention over
    the rows; logits of the frames on output rows [offset + L*codebook, +codebook); argmax."""
    model = make_model(7)
    codes_in = q01(6, 3)
    (codes,) = superres.upsample(model, LAYOUT, PROMPT, [codes_in], [5], top_k=1)
    emb, out_w = model.embed.weight.detach(), model.output.weight.detach()
    p, cb, off = len(PROMPT), LAYOUT.codebook_size, LAYOUT.audio_offset
    for layer in range(2, LAYOUT.num_quantizers):
        rows = [emb[t] for t in PROMPT[:-1]] + [emb[off - 1 - layer]]
        for f in range(codes.shape[1]):
            rows.append(sum(emb[off + lv * cb + int(codes[lv, f])] for lv in range(layer)))
        x = torch.stack(rows)[None]
        with torch.no_grad():
            hidden = model.full_hidden(x)[0, p:]
        window = out_w[off + layer * cb : off + (layer + 1) * cb]
        want = (hidden @ window.T).argmax(-1).numpy()
        np.testing.assert_array_equal(codes[layer], want, err_msg=f"layer {layer}")
