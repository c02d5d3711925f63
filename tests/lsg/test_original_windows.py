"""`sparse_windows="original"`: the original LSG code's sparse windows, for checkpoints trained with them.

The original code only reads the sparse windows docs/lsg.md describes (the `sbs` compressed positions
left and right of a block's local window) when `4 * sbs > 3 * bs / f`. Otherwise (e.g.
128/32/2 or 64/16/2 for block/sparse block/sparsity), and when `bs == f`, each block reads other
compressed positions: from inside its own local window, on one side only, or none at all. The
reference below models the original's slicing literally; the library must give the same attention.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from longsum.errors import LSGConfigError
from longsum.model.lsg import LSGBartConfig, LSGBartForConditionalGeneration
from longsum.model.lsg.attention import LSGSpec, block_index, compress, lsg_attention
from longsum.model.lsg.common import needs_original_windows
from tests.conftest import LSG_REF
from tests.lsg.test_attention import naive_lsg, qkv_mask

ATOL32 = 1e-5


# ----------------------------------------------------------------------------- reference model
def original_windows(tc: int, block_size: int, sparse_block_size: int, sparsity_factor: int) -> torch.Tensor:
    """Compressed positions each block reads in the original code, `[n_blocks, <= 2 * sbs]`; -1 = its padding.

    A model of `LSGAttentionProduct.reshape_to_sparse_block` in the original's
    lsg_converter/bart/modeling_lsg_bart.py (ccdv-ai/convert_checkpoint_to_lsg at c56734b; the
    mbart, pegasus, bert and roberta files have the same method), applied to position labels
    instead of keys. Line by line:
      - 202: the window shape is (3*sbs, bs//f): `step` = bs//f compressed positions per block;
      - 301, 304-305: `odd` = step % 2; the window length is doubled to 6*sbs; each side is padded
        with (6*sbs - step)//2 + odd rows (314-318; keys with 0, the additive mask with the dtype's
        minimum: a padded row is a masked key, -1 here);
      - 321: unfold: one window of 6*sbs rows every `step` rows, i.e. one per block;
      - 324-325: with an odd step, the last window is dropped;
      - 328-332: u = (6*sbs - 3*bs//f)//2 + odd; every block keeps rows [u - sbs : u] and
        [-(u + odd) : -(u + odd) + sbs] of its window. These are tensor slices with Python's
        semantics (negative bounds count from the end, crossed bounds give nothing), kept as is.
    A scratch run of the original method on position labels (outside this project) gave exactly
    this tensor for every bs in 1..32, f in {1, 2, 4, 8} (f dividing bs) and sbs in 1..16; with an
    odd step > 1 the original fails there (one window short), which LSGSpec refuses.
    """
    sbs, step = sparse_block_size, block_size // sparsity_factor
    odd = step % 2
    size = 6 * sbs
    pad = (size - step) // 2 + odd
    labels = F.pad(torch.arange(tc), (pad, pad), value=-1)  # [pad + tc + pad]
    windows = labels.unfold(0, size, step)  # [n_windows, 6*sbs]
    if odd:
        windows = windows[:-1]
    u = (size - 3 * block_size // sparsity_factor) // 2 + odd
    return torch.cat([windows[:, u - sbs : u], windows[:, -(u + odd) : -(u + odd) + sbs]], dim=1)


def reference_attention(q, k, v, mask, spec: LSGSpec) -> torch.Tensor:
    """LSG attention with the original's sparse windows, one block at a time, keys listed explicitly.

    The compressed sequence comes from the library's selector (selectors are tested elsewhere;
    here only which compressed positions a block reads matters). Duplicates count twice, as in the
    original's softmax. q, k, v [b, h, n, d]; n - G must be a multiple of the block size.
    """
    b, h, n, d = q.shape
    G, bs = spec.num_global_tokens, spec.block_size
    t = n - G
    assert t % bs == 0 and t > 2 * bs
    k_c, v_c, m_c = compress(q[:, :, G:], k[:, :, G:], v[:, :, G:], mask[:, G:], spec)
    m_c = m_c.expand(b, h, -1)  # [b, h, t/f]
    windows = original_windows(t // spec.sparsity_factor, bs, spec.sparse_block_size, spec.sparsity_factor)
    out = torch.empty_like(q)
    full = mask[:, None, None, :].expand(b, h, 1, n)
    out[:, :, :G] = F.scaled_dot_product_attention(q[:, :, :G], k, v, attn_mask=full)  # globals see all
    for i in range(t // bs):
        sparse = windows[i][windows[i] >= 0]  # padding rows of the original are masked keys: leave them out
        local = torch.arange(max(0, (i - 1) * bs), min(t, (i + 2) * bs))
        keys = torch.cat([k[:, :, :G], k_c[:, :, sparse], k[:, :, G + local]], dim=2)  # [b, h, K, d]
        values = torch.cat([v[:, :, :G], v_c[:, :, sparse], v[:, :, G + local]], dim=2)
        valid = torch.cat(
            [mask[:, None, :G].expand(b, h, G), m_c[:, :, sparse], mask[:, None, G + local].expand(b, h, -1)], dim=2
        )
        queries = q[:, :, G + i * bs : G + (i + 1) * bs]  # [b, h, bs, d]
        scores = queries @ keys.transpose(-1, -2) / math.sqrt(d)  # [b, h, bs, K]
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
        out[:, :, G + i * bs : G + (i + 1) * bs] = scores.softmax(-1) @ values
    return out


def spec(block_size, sparse_block_size, sparsity_factor, sparsity_type="norm", windows="original", G=1):
    return LSGSpec(
        block_size=block_size,
        sparse_block_size=sparse_block_size,
        sparsity_factor=sparsity_factor,
        sparsity_type=sparsity_type,
        num_global_tokens=G,
        sparse_windows=windows,
    )


# Settings where the original's windows differ from docs/lsg.md's: (bs, sbs, f, sparsity_type)
DIVERGENT = [
    (16, 4, 2, "norm"),  # 128/32/2 scaled down (sbs = r/2): right run only, inside the local window
    (16, 4, 2, "pooling"),
    (16, 2, 2, "pooling"),  # 128/16/2 scaled down (sbs < r/2): both runs inside the block itself
    (16, 5, 2, "pooling"),  # r/2 < sbs < 3r/4: no sparse key at all
    (8, 3, 2, "pooling"),  # 4*sbs == 3*r: the left run only
    (8, 4, 1, "norm"),  # f = 1: the sequence itself
    (4, 4, 4, "norm"),  # bs == f: the right run starts 2 positions early
    (4, 2, 4, "pooling"),
]
# Settings where they agree
AGREEING = [
    (16, 16, 2, "norm"),
    (8, 4, 2, "pooling"),
    (16, 8, 4, "norm"),
    (4, 4, 2, "bos_pooling"),
    (32, 16, 2, "stride"),
]


# ----------------------------------------------------------------------------- the reference itself
def test_reference_windows_by_hand():
    """What the original reads, worked out by hand from its slicing (r = bs/f compressed per block)."""
    # 128/32/2: r = 64, u = 0: rows [-32:0] (nothing) and [0:32] of a window starting at i*64 - 64.
    windows = original_windows(tc=64 * 6, block_size=128, sparse_block_size=32, sparsity_factor=2)
    assert windows.shape == (6, 32)
    assert windows[3].tolist() == list(range(2 * 64, 2 * 64 + 32))  # block 3: first half of block 2's
    # 128/16/2: r = 64, u = -48: rows [32:48] and [48:64] of a window starting at i*64 - 16.
    windows = original_windows(tc=64 * 6, block_size=128, sparse_block_size=16, sparsity_factor=2)
    assert windows[3].tolist() == list(range(3 * 64 + 16, 3 * 64 + 48))  # inside block 3's own range
    # bs == f: r = 1: left [i - sbs - 1, i - 1) as intended, right [i, i + sbs) instead of [i + 2, ...).
    windows = original_windows(tc=10, block_size=4, sparse_block_size=3, sparsity_factor=4)
    assert windows[5].tolist() == [1, 2, 3, 5, 6, 7]
    assert windows[0].tolist() == [-1, -1, -1, 0, 1, 2]
    # 16/5/2: r = 8, u = 3: [-2:3] and [-3:2] are both empty.
    assert original_windows(tc=40, block_size=16, sparse_block_size=5, sparsity_factor=2).shape == (5, 0)
    # Where the original works as docs/lsg.md says, it reads exactly the intended positions.
    windows = original_windows(tc=48, block_size=16, sparse_block_size=16, sparsity_factor=2)
    assert windows[3].tolist() == list(range(0, 16)) + list(range(40, 48)) + [-1] * 8
    assert windows.tolist() == intended_windows(48, 8, 16)


# ----------------------------------------------------------------------------- the library against it
@pytest.mark.parametrize("bs, sbs, f, sparsity_type", DIVERGENT)
def test_original_windows_match_the_reference(bs, sbs, f, sparsity_type):
    s = spec(bs, sbs, f, sparsity_type, G=2)
    n = 2 + 6 * bs
    q, k, v, mask = qkv_mask(b=2, h=2, n=n, d=8, dtype=torch.float32, lengths=[n - bs - 3, n])
    got = lsg_attention(q, k, v, mask, s)
    want = reference_attention(q, k, v, mask, s)
    valid = mask[:, None, :, None].expand_as(got)  # padded queries are unspecified
    torch.testing.assert_close(got[valid], want[valid], atol=ATOL32, rtol=0)
    intended = lsg_attention(q, k, v, mask, spec(bs, sbs, f, sparsity_type, windows="intended", G=2))
    assert not torch.allclose(intended[valid], want[valid], atol=1e-3)  # the settings do diverge


@pytest.mark.parametrize("bs, sbs, f, sparsity_type", DIVERGENT[:3])
def test_original_windows_with_length_not_a_multiple_of_blocks(bs, sbs, f, sparsity_type):
    """lsg_attention pads to whole blocks itself: the reference sees the padded input."""
    s = spec(bs, sbs, f, sparsity_type)
    q, k, v, mask = qkv_mask(b=1, h=2, n=1 + 5 * bs + 3, d=8, dtype=torch.float32)
    got = lsg_attention(q, k, v, mask, s)
    pad = bs - 3
    padded = [F.pad(x, (0, 0, 0, pad)) for x in (q, k, v)]
    want = reference_attention(*padded, F.pad(mask, (0, pad), value=False), s)[:, :, : 1 + 5 * bs + 3]
    torch.testing.assert_close(got, want, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("bs, sbs, f, sparsity_type", DIVERGENT[:1] + DIVERGENT[-2:-1])
def test_intended_windows_unchanged_for_divergent_settings(bs, sbs, f, sparsity_type):
    """The default still follows docs/lsg.md literally (float64 naive reference from test_attention)."""
    s = spec(bs, sbs, f, sparsity_type, windows="intended")
    n = 1 + 5 * bs
    q, k, v, mask = qkv_mask(b=1, h=2, n=n, d=4, lengths=[n - 5])
    got = lsg_attention(q, k, v, mask, s)
    want = naive_lsg(q, k, v, mask, s)
    valid = mask[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)


@pytest.mark.parametrize("bs, sbs, f, sparsity_type", AGREEING)
def test_original_and_intended_identical_where_they_agree(bs, sbs, f, sparsity_type):
    original, intended = spec(bs, sbs, f, sparsity_type), spec(bs, sbs, f, sparsity_type, windows="intended")
    for a, b in zip(block_index(6 * bs, original), block_index(6 * bs, intended)):
        assert torch.equal(a, b)
    q, k, v, mask = qkv_mask(b=2, h=2, n=1 + 6 * bs, d=8, dtype=torch.float32, lengths=[4 * bs])
    assert torch.equal(lsg_attention(q, k, v, mask, original), lsg_attention(q, k, v, mask, intended))
    settings = dict(block_size=bs, sparse_block_size=sbs, sparsity_factor=f, sparsity_type=sparsity_type)
    assert not needs_original_windows(settings)


def test_block_index_keeps_its_shape_and_masks_unused_slots():
    """The fast path is unchanged: same [n_blocks, K] index; runs shorter than sbs leave invalid slots."""
    s = spec(16, 4, 2)  # right run only
    index, valid = block_index(16 * 6, s)
    assert index.shape == valid.shape == (6, 1 + 2 * 4 + 3 * 16)
    assert not valid[:, 1 : 1 + 4].any()  # no left run
    assert valid[2:, 1 + 4 : 1 + 8].all()
    assert (index[3, 1 + 4 : 1 + 8] - (1 + 96)).tolist() == [16, 17, 18, 19]  # bank rows of compressed 16..19


# ----------------------------------------------------------------------------- when the case is hit
def hits(bs, sbs, f):
    r = bs // f
    return (r % 2 == 0 and 4 * sbs <= 3 * r) or r == 1


def intended_windows(tc, r, sbs):
    """docs/lsg.md's windows in the reference's layout: sbs left of [(i-1)*r, (i+2)*r), sbs right; -1 = out of range."""
    rows = []
    for i in range(tc // r):
        positions = [*range((i - 1) * r - sbs, (i - 1) * r), *range((i + 2) * r, (i + 2) * r + sbs)]
        rows.append([p if 0 <= p < tc else -1 for p in positions])
    return rows


def test_needs_original_windows_closed_form_and_reference():
    """needs_original_windows == the closed form == "the reference differs from docs/lsg.md's windows"."""
    for bs, f, sbs in itertools.product([1, 2, 4, 6, 8, 16, 32, 64, 128], [1, 2, 4, 8], [1, 2, 3, 4, 5, 6, 8, 16, 32]):
        if bs % f:
            continue
        r = bs // f
        expected = hits(bs, sbs, f) and not (r % 2 and r > 1)
        assert needs_original_windows(dict(block_size=bs, sparse_block_size=sbs, sparsity_factor=f)) == expected
        if r % 2 and r > 1:
            continue  # the original fails with these settings
        reference = original_windows(5 * r, bs, sbs, f)
        assert (reference.tolist() != intended_windows(5 * r, r, sbs)) == expected, (bs, sbs, f)


def test_needs_original_windows_known_settings():
    assert needs_original_windows(dict(block_size=128, sparse_block_size=32, sparsity_factor=2))
    assert needs_original_windows(dict(block_size=64, sparse_block_size=16, sparsity_factor=2))
    assert needs_original_windows(dict(block_size=4, sparse_block_size=4, sparsity_factor=4))  # bs == f
    assert not needs_original_windows(dict(block_size=128, sparse_block_size=128, sparsity_factor=2))
    assert not needs_original_windows(dict(block_size=256, sparse_block_size=0, sparsity_factor=2))  # no sparse
    assert not needs_original_windows(dict(block_size=128, sparse_block_size=32, sparsity_type="none"))
    assert not needs_original_windows(dict(block_size=128, sparse_block_size=32, sparsity_type=None))
    assert not needs_original_windows({})  # defaults: 128/128/2
    assert needs_original_windows(LSGBartConfig(block_size=16, sparse_block_size=4))  # a config object
    assert not needs_original_windows(LSGBartConfig())


# ----------------------------------------------------------------------------- config and spec
def test_config_key_default_and_round_trip():
    config = LSGBartConfig(block_size=16, sparse_block_size=4, sparse_windows="original")
    assert LSGBartConfig().sparse_windows == "intended"
    assert LSGBartConfig.from_dict(config.to_dict()).sparse_windows == "original"
    legacy = {k: v for k, v in LSGBartConfig().to_dict().items() if k != "sparse_windows"}
    assert LSGBartConfig.from_dict(legacy).sparse_windows == "intended"  # configs without the key load
    assert LSGSpec.from_config(config).sparse_windows == "original"

    class Bare:  # a config object that predates the key
        block_size, sparse_block_size, sparsity_factor, sparsity_type = 16, 4, 2, "norm"
        num_global_tokens, lsh_num_pre_rounds = 1, 1

    assert LSGSpec.from_config(Bare()).sparse_windows == "intended"


def test_model_layers_use_the_flag():
    torch.manual_seed(0)
    config = LSGBartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
        block_size=16, sparse_block_size=4, sparse_windows="original",
    )  # fmt: skip
    model = LSGBartForConditionalGeneration(config).eval()
    assert model.model.encoder.layers[0].self_attn.lsg_spec.sparse_windows == "original"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparse_windows="shifted"), "unknown sparse_windows"),
        (dict(block_size=6, sparse_block_size=6, sparsity_factor=2, sparse_windows="original"), "cannot run"),
    ],
)
def test_bad_sparse_windows_are_one_line_errors(kwargs, message):
    with pytest.raises(LSGConfigError, match=message) as err:
        LSGSpec(**kwargs)
    assert "\n" not in str(err.value)
    LSGSpec(**{**kwargs, "sparse_windows": "intended"})  # fine with docs/lsg.md's windows


# ----------------------------------------------------------------------------- the loader
def write_config(folder, **changes):
    config = json.loads((LSG_REF / "a_norm" / "config.json").read_text())
    config.update(changes)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_loader_sets_original_windows_for_original_checkpoints(tmp_path, capsys, monkeypatch):
    from longsum.model import checkpoint as models
    from longsum.model.checkpoint import load_config

    monkeypatch.setattr(models, "_SAID", set())  # said once per process: start afresh
    folder = write_config(tmp_path / "orig", block_size=16, sparse_block_size=4)  # model_type "bart"
    _, config = load_config(folder)
    assert config.sparse_windows == "original"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "sparse_windows=original" in lines[0] and "16/4/2" in lines[0]


def test_loaded_original_checkpoint_runs_with_original_windows(tmp_path, capsys, monkeypatch):
    """A whole checkpoint in the original's format (weights, tokenizer): every encoder layer gets the flag,
    and the loader says so once (per process, however often a command reads the config)."""
    import shutil

    from longsum.model import checkpoint as models
    from longsum.model.checkpoint import load_model

    monkeypatch.setattr(models, "_SAID", set())  # other tests in this process may have said it already

    folder = tmp_path / "ckpt"
    shutil.copytree(LSG_REF / "b_pooling", folder, ignore=shutil.ignore_patterns("*.pt", "*.py"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_size": 16, "sparse_block_size": 4}))
    model, _ = load_model(folder, device="cpu", dtype="fp32")
    assert {layer.self_attn.lsg_spec.sparse_windows for layer in model.model.encoder.layers} == {"original"}
    load_model(folder, device="cpu", dtype="fp32")  # again: no second line
    err = capsys.readouterr().err  # also transformers' progress bar: count our line only
    assert len([line for line in err.splitlines() if "sparse_windows" in line]) == 1
    with torch.no_grad():  # long enough for the blocked path
        out = model.get_encoder()(input_ids=torch.randint(5, 300, (1, 100))).last_hidden_state
    assert out.shape == (1, 101, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "changes",
    [
        dict(model_type="lsg_bart", block_size=16, sparse_block_size=4),  # longsum's own format
        dict(block_size=16, sparse_block_size=16),  # original format, settings that agree
        dict(block_size=16, sparse_block_size=4, sparse_windows="intended"),  # an explicit choice wins
    ],
    ids=["longsum-format", "agreeing-settings", "explicit-key"],
)
def test_loader_keeps_intended_windows(tmp_path, capsys, changes):
    from longsum.model.checkpoint import load_config

    _, config = load_config(write_config(tmp_path / "ckpt", **changes))
    assert config.sparse_windows == "intended"
    assert capsys.readouterr().err == ""
