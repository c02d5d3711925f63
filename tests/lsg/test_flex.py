"""The flex LSG kernel against the blocked SDPA kernel (`lsg_attention`), which test_attention checks
against a literal float64 reference.

Most comparisons run flex eagerly (`lsg_flex(..., flex_attention)`): seconds instead of a compile per
shape. Eager flex applies `mask_mod` to every pair and ignores the tile lists, so the tiles are checked
on their own (`test_tiles_cover_the_pattern`) and by one compiled run, which follows them.

Every output row is compared, padded query rows included: both kernels give a padded query the keys
of its block, and the globals keep every such row non-empty.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as flex_attention_module

from longsum.model import decoding
from longsum.model.lsg import flex as lsg_flex_module
from longsum.model.lsg.attention import LSGSpec, intended_sparse_offsets, lsg_attention, sparse_offsets
from longsum.model.lsg.flex import (
    KV_TILE,
    Q_TILE,
    block_mask,
    flex_attention,
    flex_lsg_attention,
    lsg_flex,
    pattern,
    window_runs,
)
from longsum.registry import SPARSITY_TYPES

ATOL = RTOL = 2e-5
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile"),  # eager flex, on purpose
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),  # torch importing inductor
]


def qkv_mask(b=2, h=4, n=300, d=16, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    for row, length in enumerate(lengths or []):
        mask[row, length:] = False
    return q, k, v, mask


def both(q, k, v, mask, spec, flex=flex_attention):
    """(blocked, flex) outputs; lsh draws its projections from torch's RNG: the same seed for both."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        ref = lsg_attention(q, k, v, mask, spec)
        torch.manual_seed(1)
        got = lsg_flex(q, k, v, torch.ones_like(q[:, 0, :, 0], dtype=torch.bool) if mask is None else mask, spec, flex)
    return ref, got


@pytest.fixture(autouse=True)
def fresh_lines(monkeypatch):
    """Each test sees its own step-aside lines (each is printed once per process)."""
    monkeypatch.setattr(decoding, "_TOLD", set())
    monkeypatch.setattr(lsg_flex_module, "_BROKEN", {})
    monkeypatch.setattr(lsg_flex_module, "_COMPILED", set())


def asides(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "steps aside" in line]


# (block_size, sparse_block_size, sparsity_factor, num_global_tokens); lengths 2 + 300 are not whole blocks.
SHAPES = [(32, 16, 4, 2), (16, 16, 2, 1), (32, 32, 1, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-sbs{}-f{}-G{}".format(*s))
@pytest.mark.parametrize("sparsity_type", SPARSITY_TYPES)
def test_matches_blocked_kernel_on_a_padded_batch(sparsity_type, shape):
    bs, sbs, f, G = shape
    spec = LSGSpec(block_size=bs, sparse_block_size=sbs, sparsity_factor=f, sparsity_type=sparsity_type,
                   num_global_tokens=G)  # fmt: skip
    q, k, v, mask = qkv_mask(n=G + 300, lengths=[G + 300, G + 170])  # row 1: padding over several blocks
    ref, got = both(q, k, v, mask, spec)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("sparsity_type", ["norm", "pooling", "lsh", "none"])
def test_matches_blocked_kernel_without_a_mask(sparsity_type):
    spec = LSGSpec(block_size=32, sparse_block_size=32, sparsity_factor=2, sparsity_type=sparsity_type)
    q, k, v, _ = qkv_mask(b=1, n=1 + 256)
    ref, got = both(q, k, v, None, spec)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


# (block_size, sparse_block_size, sparsity_factor): original windows that differ from the intended ones
# (4*sbs <= 3*bs/f, and bs == f) without reading a compressed key twice.
ORIGINAL = [(64, 4, 4), (32, 8, 2), (8, 8, 8)]


@pytest.mark.parametrize("settings", ORIGINAL, ids=lambda s: "bs{}-sbs{}-f{}".format(*s))
@pytest.mark.parametrize("sparsity_type", ["norm", "stride", "pooling"])
def test_matches_blocked_kernel_with_original_windows(sparsity_type, settings):
    bs, sbs, f = settings
    spec = LSGSpec(block_size=bs, sparse_block_size=sbs, sparsity_factor=f, sparsity_type=sparsity_type,
                   sparse_windows="original")  # fmt: skip
    assert sparse_offsets(spec) != intended_sparse_offsets(sbs, bs // f)  # the case is worth testing
    assert window_runs(spec) is not None
    q, k, v, mask = qkv_mask(n=1 + 5 * bs + 3, lengths=[1 + 5 * bs + 3, 1 + 3 * bs])
    ref, got = both(q, k, v, mask, spec)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def grads(kernel, q, k, v, mask, spec):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = kernel(*leaves, mask, spec)
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    return [out.detach()] + [x.grad for x in leaves]


def test_backward_on_cpu_steps_aside(capsys):
    """torch's flex has no CPU backward: training on CPU gets the blocked kernel and its gradients."""
    spec = LSGSpec(block_size=16, sparse_block_size=16, sparsity_factor=2, sparsity_type="pooling")
    q, k, v, mask = qkv_mask(n=1 + 100, lengths=[101, 60])
    got, ref = grads(flex_lsg_attention, q, k, v, mask, spec), grads(lsg_attention, q, k, v, mask, spec)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert asides(capsys) == [
        "LSG flex attention steps aside for the stock path: flex_attention has no backward on CPU"
        " (LSG's blocked SDPA kernel)"
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity_type", ["norm", "pooling", "none"])
def test_compiled_kernel_and_gradients_match_on_cuda(sparsity_type, capsys):
    spec = LSGSpec(block_size=64, sparse_block_size=64, sparsity_factor=2, sparsity_type=sparsity_type)
    q, k, v, mask = (x.cuda() for x in qkv_mask(b=2, h=2, n=1 + 300, d=64, lengths=[301, 150]))
    got, ref = grads(flex_lsg_attention, q, k, v, mask, spec), grads(lsg_attention, q, k, v, mask, spec)
    for a, b in zip(got, ref):  # other kernels, other summation orders (not yet run: no GPU where written)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert asides(capsys) == []


@pytest.mark.parametrize(
    "settings",
    [(128, 128, 2, 1), (32, 16, 4, 2), (256, 64, 4, 1), (64, 4, 4, 1, "original"), (32, 32, 1, 3)],
    ids=str,
)
def test_tiles_cover_the_pattern(settings):
    """Listed tiles hold every allowed (query, key) pair; full tiles (no mask_mod) only allowed ones."""
    bs, sbs, f, G, *windows = settings
    spec = LSGSpec(block_size=bs, sparse_block_size=sbs, sparsity_factor=f, num_global_tokens=G,
                   sparse_windows=windows[0] if windows else "intended")  # fmt: skip
    t = 10 * bs
    tc = t // f
    N = t + tc + G
    valid = torch.ones(2, 1, N, dtype=torch.bool)
    valid[1, :, 6 * bs + 5 : t] = False  # row 1: padded tokens, from inside a key tile
    valid[1, :, t + 6 * bs // f + 1 : t + tc] = False  # and their compressed keys
    tiles = block_mask(t, tc, spec, valid, grad=False)
    allowed = pattern(torch.arange(t).view(-1, 1), torch.arange(N).view(1, -1), t, tc, spec, window_runs(spec))
    allowed = allowed & valid[:, :, None, :]  # [2, 1, t, N]

    def dense(counts, indices):  # [2, 1, n_qt, n_kt] tile lists -> [2, 1, t, N] pairs
        n_kt = indices.shape[-1]
        listed = torch.arange(n_kt) < counts[..., None]
        on = torch.zeros_like(listed).scatter(-1, indices.long(), listed)
        return on.repeat_interleave(Q_TILE, -2)[..., :t, :].repeat_interleave(KV_TILE, -1)[..., :N]

    full = dense(tiles.full_kv_num_blocks, tiles.full_kv_indices)
    listed = full | dense(tiles.kv_num_blocks, tiles.kv_indices)
    assert not (allowed & ~listed).any(), "an allowed pair lies outside the listed tiles"
    assert not (full & ~allowed).any(), "a full tile holds a pair the pattern or the padding forbids"
    assert full.any(), "no full tile: mask_mod would run everywhere"
    # The pattern itself: block 5 reads its 3 local blocks, its sparse windows and the globals.
    left, right = sparse_offsets(spec)
    comp = [5 * (bs // f) + o for o in left + right]
    expect = list(range(4 * bs, 7 * bs)) + [t + c for c in comp if 0 <= c < tc] + list(range(t + tc, N))
    assert allowed[0, 0, 5 * bs].nonzero().flatten().tolist() == sorted(expect)


def test_short_inputs_are_dense_attention(capsys):
    spec = LSGSpec(block_size=32, sparse_block_size=32)
    q, k, v, mask = qkv_mask(n=1 + 64, lengths=[65, 40])  # t = 2 * bs: the longest "short" input
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(flex_lsg_attention(q, k, v, mask, spec), dense, atol=0, rtol=0)
    assert asides(capsys) == []


def test_dropout_steps_aside_to_the_blocked_kernel(capsys):
    spec = LSGSpec(block_size=32, sparse_block_size=32)
    q, k, v, mask = qkv_mask(n=1 + 200, lengths=[201, 120])
    outs = []
    for _ in range(2):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            outs.append(flex_lsg_attention(q, k, v, mask, spec, dropout_p=0.5))
    torch.manual_seed(3)
    torch.testing.assert_close(outs[0], lsg_attention(q, k, v, mask, spec, dropout_p=0.5), atol=0, rtol=0)
    assert asides(capsys) == [
        "LSG flex attention steps aside for the stock path: flex_attention has no attention dropout"
        " (dropout_p=0.5, training) (LSG's blocked SDPA kernel)"
    ]


def test_windows_reading_a_key_twice_step_aside(capsys):
    """sbs=4, bs/f=14: the original windows overlap, so the blocked kernel weighs some keys twice."""
    spec = LSGSpec(block_size=28, sparse_block_size=4, sparsity_factor=2, sparse_windows="original")
    left, right = sparse_offsets(spec)
    assert set(left) & set(right) and window_runs(spec) is None
    q, k, v, mask = qkv_mask(n=1 + 6 * 28, lengths=[169, 100])
    got = flex_lsg_attention(q, k, v, mask, spec)
    torch.testing.assert_close(got, lsg_attention(q, k, v, mask, spec), atol=0, rtol=0)
    assert len(asides(capsys)) == 1


def test_failing_compilation_steps_aside_once(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(lsg_flex_module, "compiled_flex", lambda: broken)
    spec = LSGSpec(block_size=32, sparse_block_size=32)
    q, k, v, mask = qkv_mask(n=1 + 200, lengths=[201, 120])
    for _ in range(2):
        torch.testing.assert_close(flex_lsg_attention(q, k, v, mask, spec), lsg_attention(q, k, v, mask, spec))
    assert asides(capsys) == [
        "LSG flex attention steps aside for the stock path: flex_attention failed on cpu torch.float32:"
        " RuntimeError: no C++ compiler (LSG's blocked SDPA kernel)"
    ]


def test_unsupported_dtype_steps_aside(capsys):
    spec = LSGSpec(block_size=32, sparse_block_size=32)
    q, k, v, mask = (x.double() if x.is_floating_point() else x for x in qkv_mask(n=1 + 200))
    torch.testing.assert_close(flex_lsg_attention(q, k, v, mask, spec), lsg_attention(q, k, v, mask, spec))
    assert len(asides(capsys)) == 1


@pytest.mark.slow
def test_compiled_kernel_matches_blocked_kernel(monkeypatch, capsys):
    """The public kernel, compiled (it follows the tile lists, eager flex does not): one small shape.

    Dynamo's recompile limit is set to 0, where dynamo would run flex eagerly: the kernel must lift it
    for its own calls. Eager flex is made an error (then a step-aside line), so it cannot pass unseen.
    """
    monkeypatch.setattr(flex_attention_module, "_WARNINGS_SHOWN", set())  # torch warns once per process
    spec = LSGSpec(block_size=64, sparse_block_size=64, sparsity_factor=2, sparsity_type="norm")
    q, k, v, mask = qkv_mask(b=2, h=2, n=1 + 300, lengths=[301, 150])  # per-head validity and padding
    # (config.patch, not monkeypatch: undoing a setattr on dynamo's config deletes the key for the process)
    with torch._dynamo.config.patch(recompile_limit=0), torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*flex_attention called without torch.compile")
        got = flex_lsg_attention(q, k, v, mask, spec)
    torch.testing.assert_close(got, lsg_attention(q, k, v, mask, spec), atol=ATOL, rtol=RTOL)
    assert asides(capsys) == []
