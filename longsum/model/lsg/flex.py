"""LSG attention (docs/lsg.md) as one FlexAttention call over a static block mask.

Same contract and results as `longsum.model.lsg.attention.lsg_attention`; only the computation differs:
* Global queries attend to every key: one dense SDPA call, as in the blocked kernel.
* Ordinary queries go through one `flex_attention` call over keys laid out
  `[tokens (t) | compressed (t/f) | globals (G)]`. Tokens come first so that LSG's blocks line up with
  flex's query tiles (block `i` is query rows `[i*bs, (i+1)*bs)`), and the keys a block reads are three
  runs: its local window, its two sparse windows (one run each), the globals at the end.
* Which key tiles each query tile touches depends only on `(t, spec)`: built once per length and
  device (`static_tiles`, cached like `block_index`). What depends on the data (padding, the
  per-head validity of compressed keys) is read inside `mask_mod` from a `[b, 1|h, N]` validity
  tensor. Tiles whose keys are all allowed and all valid are passed as "full" tiles, where flex skips
  `mask_mod`; fully invalid tiles (padding) are dropped.

The compressed keys come from the blocked kernel's own `compress`, and the windows from its
`sparse_offsets`, so both kernels read the same keys.

Flex is only fast compiled: eager `flex_attention` materialises the whole `[b, h, t, N]` score matrix
(1.2 GB and ~100x slower at 4k tokens, base model, CPU). `flex_lsg_attention` therefore uses one
`torch.compile(flex_attention, dynamic=False)`, created lazily on the first call and shared by every
module (`compiled_flex`). Static because inductor's CPU flex kernel does not build for symbolic
lengths (torch 2.13), and each padded length has its own tiles anyway: each new input shape compiles
once (15-50 s on one CPU thread when inductor's on-disk cache is cold, a few seconds when warm), up
to `MAX_COMPILED_SHAPES` per process.

Where flex cannot serve, the kernel steps aside to `lsg_attention` with one stderr line: no
flex_attention in this torch, attention dropout (training), a backward on CPU (torch's flex has
none), a dtype flex does not compile for, sparse windows that read a compressed key twice, too many
shapes compiled, or compiling/running flex failing (then not retried for that device and dtype).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from longsum.errors import describe
from longsum.model.lsg.attention import LSGSpec, blocks_and_globals, compress, lsg_attention, sparse_offsets

try:  # torch >= 2.5; the kernel steps aside without it
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    BlockMask = flex_attention = None

# Query tile x key tile of the block mask. 128 query rows: one LSG block at the default bs = 128.
# 64 key columns: sparse windows start at multiples of bs/f = 64 (defaults), so they cover whole tiles.
Q_TILE, KV_TILE = 128, 64
# Dtypes flex's CPU and CUDA kernels both compile for.
FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of the [blocks, N] pattern evaluated at once when building the tiles (bounded host memory).
PATTERN_BUDGET = 1 << 22

# Distinct call shapes (lengths, mostly) compiled per process. Dynamo keeps at most
# `recompile_limit` (8) compiled versions of flex_attention and then runs it *eagerly*, with the full
# score matrix; the kernel raises that limit for its own calls to this, and steps aside past it.
MAX_COMPILED_SHAPES = 64

_BROKEN: dict[tuple[str, torch.dtype], str] = {}  # (device type, dtype) -> why flex failed there
_COMPILED: set[tuple] = set()  # call shapes compiled so far


@lru_cache(maxsize=1)
def compiled_flex():
    """`flex_attention` compiled once per process (lazily: importing longsum compiles nothing).

    `dynamic=False`: inductor's CPU flex kernel fails to build with symbolic lengths (torch 2.13: a C++
    compile error on the second length), and static kernels are the fast ones. Calls run with dynamo's
    recompile limit raised to `MAX_COMPILED_SHAPES` (+ margin), or the 9th length would run eagerly.
    """
    compiled = torch.compile(flex_attention, dynamic=False)
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7

    def run(q, k, v, block_mask):
        with config.patch(**{limit: max(getattr(config, limit), MAX_COMPILED_SHAPES + 8)}):
            return compiled(q, k, v, block_mask=block_mask)

    return run


def window_runs(spec: LSGSpec) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The two sparse windows as `[lo, hi)` offsets from `i * bs/f`, or None if flex cannot express them.

    A mask allows a key once; the blocked kernel reads a key as often as the windows list it. Some
    "original" windows overlap (e.g. sbs=4, bs/f=14), reading compressed keys twice: those step aside.
    """
    if not spec.sparse:
        return (0, 0), (0, 0)
    runs = []
    for offsets in sparse_offsets(spec):
        lo, hi = (offsets[0], offsets[-1] + 1) if offsets else (0, 0)
        if list(offsets) != list(range(lo, hi)):
            return None
        runs.append((lo, hi))
    (l0, l1), (r0, r1) = runs
    if l0 < l1 and r0 < r1 and l0 < r1 and r0 < l1:
        return None
    return runs[0], runs[1]


def pattern(q: torch.Tensor, kv: torch.Tensor, t: int, tc: int, spec: LSGSpec, runs) -> torch.Tensor:
    """Whether query row `q` (in [0, t)) may read key column `kv` (in [0, t + tc + G)), data aside.

    Elementwise on broadcastable integer tensors; used both by `mask_mod` and to build the tiles, so
    the two cannot disagree.
    """
    bs, r = spec.block_size, spec.block_size // spec.sparsity_factor
    (l0, l1), (r0, r1) = runs
    block = q // bs
    local = (kv < t) & ((kv // bs - block).abs() <= 1)  # blocks i-1, i, i+1
    rel = kv - t - block * r  # compressed position relative to i * bs/f
    sparse = (kv >= t) & (kv < t + tc) & (((rel >= l0) & (rel < l1)) | ((rel >= r0) & (rel < r1)))
    return local | sparse | (kv >= t + tc)  # the globals sit at the end


@lru_cache(maxsize=64)
def static_tiles(t: int, spec: LSGSpec, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Which key tiles each query tile reads (`touch`) and reads whole (`full`), both [n_qt, n_kt] bool.

    `touch`: some query of the tile may read some key of the tile. `full`: every query of the tile may
    read every key of the tile (validity aside). A partial last key tile is never full.
    """
    # Cached across calls: build normal tensors even when first called under inference_mode, or a
    # later training step could not save them for backward (as `block_index`).
    with torch.inference_mode(False):
        return tuple(x.to(device) for x in _static_tiles(t, spec))


def _static_tiles(t: int, spec: LSGSpec) -> tuple[torch.Tensor, torch.Tensor]:
    bs, G = spec.block_size, spec.num_global_tokens
    tc = t // spec.sparsity_factor if spec.sparse else 0
    N, n_blocks = t + tc + G, t // bs
    n_qt, n_kt = -(-t // Q_TILE), -(-N // KV_TILE)
    runs = window_runs(spec)
    kv = torch.arange(n_kt * KV_TILE)
    # All queries of a block read the same keys: evaluate the pattern once per block, a chunk of
    # blocks at a time, reduced at once to per-tile any/all ([n_blocks, n_kt]).
    any_kv, all_kv = [], []
    step = max(1, PATTERN_BUDGET // kv.numel())
    for start in range(0, n_blocks, step):
        rows = torch.arange(start, min(n_blocks, start + step)).view(-1, 1) * bs  # [c, 1] first query of each block
        allowed = pattern(rows, kv.view(1, -1), t, tc, spec, runs) & (kv < N)  # [c, n_kt * KV_TILE]
        allowed = allowed.view(-1, n_kt, KV_TILE)  # [c, n_kt, KV_TILE]
        any_kv.append(allowed.any(-1))
        all_kv.append(allowed.all(-1))
    any_kv, all_kv = torch.cat(any_kv), torch.cat(all_kv)  # [n_blocks, n_kt]
    # A query tile is the union (touch) / intersection (full) of the blocks it overlaps.
    touch = torch.zeros(n_qt, n_kt, dtype=torch.bool)
    full = torch.zeros(n_qt, n_kt, dtype=torch.bool)
    for qt in range(n_qt):
        first, last = qt * Q_TILE // bs, (min(t, (qt + 1) * Q_TILE) - 1) // bs
        touch[qt] = any_kv[first : last + 1].any(0)
        full[qt] = all_kv[first : last + 1].all(0)
    return touch, full


def _tile_lists(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's form of a [.., n_qt, n_kt] bool map: counts [.., n_qt] and indices, listed tiles first."""
    counts = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, order


def _mask_mod(t: int, tc: int, spec: LSGSpec, runs, valid: torch.Tensor):
    """mask_mod(b, h, q, kv): the static pattern and the key's validity in `valid` [b, 1|h, N]."""
    if valid.shape[1] == 1:  # one validity for all heads (padding; most selectors)

        def mask_mod(b, h, q, kv):
            return pattern(q, kv, t, tc, spec, runs) & valid[b, 0, kv]

    else:  # per-head compressed validity (norm, stride, block_stride, lsh)

        def mask_mod(b, h, q, kv):
            return pattern(q, kv, t, tc, spec, runs) & valid[b, h, kv]

    return mask_mod


def block_mask(t: int, tc: int, spec: LSGSpec, valid: torch.Tensor, grad: bool):
    """The BlockMask for `t` ordinary queries over keys with validity `valid` [b, 1|h, N].

    Per call only the tiles' validity is new: full tiles must hold valid keys only (flex skips
    `mask_mod` there), and tiles with no valid key are dropped.
    """
    b, hm, N = valid.shape
    touch, full = static_tiles(t, spec, str(valid.device))  # [n_qt, n_kt]
    n_kt = touch.shape[1]
    valid_tiles = F.pad(valid, (0, n_kt * KV_TILE - N)).view(b, hm, n_kt, KV_TILE)  # [b, hm, n_kt, KV_TILE]
    all_valid, any_valid = valid_tiles.all(-1)[:, :, None], valid_tiles.any(-1)[:, :, None]  # [b, hm, 1, n_kt]
    full_tiles = full & all_valid  # [b, hm, n_qt, n_kt]
    partial_tiles = touch & any_valid & ~full_tiles
    return BlockMask.from_kv_blocks(
        *_tile_lists(partial_tiles),
        *_tile_lists(full_tiles),
        BLOCK_SIZE=(Q_TILE, KV_TILE),
        mask_mod=_mask_mod(t, tc, spec, window_runs(spec), valid),
        seq_lengths=(t, N),
        compute_q_blocks=grad,  # the transposed lists only the backward reads
    )


def lsg_flex(q, k, v, mask: torch.Tensor, spec: LSGSpec, flex) -> torch.Tensor:
    """The flex computation (no dropout) with the given `flex_attention` (compiled or eager).

    q, k, v: `[b, h, n, d]` with `t = n - G > 2 * bs`; mask: `[b, n]` bool. Returns `[b, h, n, d]`.
    """
    b, h, n, d = q.shape
    G = spec.num_global_tokens
    q, k, v, mask, t, out = blocks_and_globals(q, k, v, mask, spec)  # padded to blocks; globals' rows done

    k_t, v_t, m_t = k[:, :, G:], v[:, :, G:], mask[:, G:]  # [b, h, t, d], [b, t]
    if spec.sparse:
        k_c, v_c, m_c = compress(q[:, :, G:], k_t, v_t, m_t, spec)  # [b, h, tc, d], [b, 1|h, tc]
    else:
        k_c, v_c, m_c = k_t[:, :, :0], v_t[:, :, :0], m_t[:, None, :0]
    tc, hm = k_c.shape[2], m_c.shape[1]
    keys = torch.cat([k_t, k_c, k[:, :, :G]], dim=2)  # [b, h, N, d], N = t + tc + G
    values = torch.cat([v_t, v_c, v[:, :, :G]], dim=2)
    valid = torch.cat([m_t[:, None].expand(b, hm, t), m_c, mask[:, None, :G].expand(b, hm, G)], dim=2)  # [b, hm, N]
    del k_c, v_c  # peak memory: only the key/value copies stay alive

    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    mask_tiles = block_mask(t, tc, spec, valid, grad)
    out[:, G:] = flex(q[:, :, G:], keys, values, block_mask=mask_tiles).transpose(1, 2)  # [b, t, h, d]
    return out[:, :n].transpose(1, 2)  # [b, h, n, d]


def _why_not(q, k, v, spec: LSGSpec, dropout_p: float) -> str | None:
    """Why flex cannot compute this call (None: it can, and its shape is counted as compiled)."""
    if flex_attention is None:
        return f"torch {torch.__version__} has no flex_attention"
    if dropout_p > 0:
        return f"flex_attention has no attention dropout (dropout_p={dropout_p}, training)"
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if grad and q.device.type == "cpu":
        return "flex_attention has no backward on CPU"
    if q.dtype not in FLEX_DTYPES:
        return f"flex_attention does not compile for {q.dtype}"
    if window_runs(spec) is None:
        return "these sparse windows read some compressed keys twice, which a mask cannot express"
    if _BROKEN.get((q.device.type, q.dtype)):
        return _BROKEN[(q.device.type, q.dtype)]
    shape = (q.shape, q.dtype, q.device, spec, grad)  # what a compiled version is for
    if shape not in _COMPILED and len(_COMPILED) >= MAX_COMPILED_SHAPES:
        return f"{MAX_COMPILED_SHAPES} input shapes compiled already (each new one compiles again)"
    _COMPILED.add(shape)
    return None


def _step_aside(reason: str) -> None:
    from longsum.model.decoding import step_aside  # lazy: decoding imports the models, which import this module

    step_aside("LSG flex attention", f"{reason} (LSG's blocked SDPA kernel)")


def flex_lsg_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    spec: LSGSpec,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Local + sparse + global attention with compiled FlexAttention: the contract of `lsg_attention`.

    Args:
        q, k, v: `[b, h, n, d]`; the first `spec.num_global_tokens` positions are global tokens.
        mask: `[b, n]`, True (or 1) where a key may be attended; None means all.
        spec: LSG settings.
        dropout_p: attention dropout; above 0 the blocked kernel computes the call (flex has none).

    Returns:
        `[b, h, n, d]`. Inputs with `n - G <= 2 * block_size` use ordinary full attention, as in the
        original. Where flex cannot serve, `lsg_attention`'s result, after one stderr line.
    """
    b, h, n, d = q.shape
    mask = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
    if n - spec.num_global_tokens <= 2 * spec.block_size:  # short input: the local window covers everything
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=dropout_p)
    why = _why_not(q, k, v, spec, dropout_p)
    if why is None:
        try:
            return lsg_flex(q, k, v, mask, spec, compiled_flex())
        except Exception as err:  # compilation (inductor, no compiler) or the kernel failed: never fail the model
            why = f"flex_attention failed on {q.device.type} {q.dtype}: {describe(err, 200)}"
            _BROKEN[(q.device.type, q.dtype)] = why  # do not retry (and recompile) on every call
    _step_aside(why)
    return lsg_attention(q, k, v, mask, spec, dropout_p)
