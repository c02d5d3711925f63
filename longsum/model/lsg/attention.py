"""LSG attention (local + sparse + global) as a pure function on `[b, h, n, d]` tensors.

The behaviour is the contract in `docs/lsg.md` (the original LSG code, ccdv-ai). Notation:
`G` global tokens (always the first `G` positions), `t = n - G` ordinary tokens, `bs` block size,
`sbs` sparse block size, `f` sparsity factor, `r = bs / f` compressed positions per block,
`tc = t / f` compressed length.

How it is computed, and why:
* Global queries attend to every key: one `scaled_dot_product_attention` (SDPA) call.
* Ordinary queries are cut into blocks of `bs`. Block `i` sees `K = G + 2*sbs + 3*bs` keys: the
  globals, `sbs` compressed keys on each side of its window, and the blocks `i-1, i, i+1`. All
  those keys live in one "bank" `[globals | tokens | compressed]`, and a small static index
  `[n_blocks, K]` (cached per length) says which bank rows each block reads and which slots are
  out of range. Gathering a chunk of blocks is a single `index_select`: no `unfold` + `cat`
  triple copies, and never a `t x t` tensor.
* The softmax runs in SDPA with a boolean key mask that broadcasts over the queries of a block
  (`[.., 1, K]`), which the fused CPU/CUDA kernels handle at full speed.
* Blocks are processed a chunk at a time so the gathered keys/values stay a bounded size.

The sparse selectors (how the compressed sequence is built) are small functions in
`SPARSE_SELECTORS`, chosen by name. This file's `lsg_attention` is one kernel (how the whole pattern is
computed); `longsum.model.lsg.kernels` lists them all and picks one per attention module from the config.

Sparse windows (`LSGSpec.sparse_windows`): "intended" reads the `sbs` compressed positions just
left and just right of a block's local window, as docs/lsg.md says. The original code computes those
windows with slicing offsets that only give that range when `4 * sbs > 3 * bs / f`; otherwise (and
when `bs == f`) it reads other positions, often inside the block's own local window, or none.
"original" reproduces its windows, for checkpoints trained by it with such settings (see
`original_sparse_offsets`). Only the block index changes; the computation is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from longsum.errors import LSGConfigError
from longsum.registry import MAX_GLOBAL_TOKENS, SPARSE_WINDOWS, SPARSITY_TYPES

# Elements (per keys and per values tensor) gathered at once on CPU: bounds the extra memory of a
# forward to ~2 x 16 MiB in fp32 whatever the length; small chunks also stay in cache (faster on CPU).
GATHER_BUDGET = 1 << 22
# Bytes (per keys and per values tensor) gathered at once on any other device (CUDA...). There the cache
# argument does not hold: each chunk costs ~10 kernel launches and one SDPA call over `h * c` blocks, and
# at the CPU budget a base-size layer (h 12, K 641, d 64) makes SDPA calls of 8 blocks, 96 query tiles
# for a GPU's ~132 SMs, 16 times per 16k tokens. 256 MiB covers a whole 16k base-size layer in one chunk
# in fp32 (b 1) or bf16 (b 2): ~1500 tiles per call, one launch sequence per layer, and still a bound
# (~0.5 GB for keys + values) that a long or large batch cannot pass.
DEVICE_GATHER_BYTES = 256 << 20


def gather_budget(device: torch.device, itemsize: int) -> int:
    """Elements of keys (and of values) that `lsg_attention` gathers per chunk of blocks on `device`."""
    return GATHER_BUDGET if device.type == "cpu" else DEVICE_GATHER_BYTES // itemsize


@dataclass(frozen=True)
class LSGSpec:
    """The LSG settings that shape attention (names and defaults as in docs/lsg.md)."""

    block_size: int = 128
    sparse_block_size: int = 128
    sparsity_factor: int = 2
    sparsity_type: str | None = "norm"
    num_global_tokens: int = 1
    lsh_num_pre_rounds: int = 1
    sparse_windows: str = "intended"

    def __post_init__(self) -> None:
        if self.sparsity_type is None:
            object.__setattr__(self, "sparsity_type", "none")
        if self.sparsity_type not in SPARSITY_TYPES:
            raise LSGConfigError(
                f"unknown sparsity_type {self.sparsity_type!r}; choose one of {', '.join(SPARSITY_TYPES)}"
            )
        if self.block_size < 1:
            raise LSGConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.sparsity_factor < 1 or self.block_size % self.sparsity_factor:
            raise LSGConfigError(
                f"block_size ({self.block_size}) must be divisible by sparsity_factor ({self.sparsity_factor}); "
                f"try sparsity_factor in {_divisors(self.block_size)}"
            )
        if not 1 <= self.num_global_tokens <= MAX_GLOBAL_TOKENS:  # the rows of `global_embeddings`
            raise LSGConfigError(
                f"num_global_tokens must be between 1 and {MAX_GLOBAL_TOKENS}, got {self.num_global_tokens}"
            )
        if self.sparse_block_size < 0:
            raise LSGConfigError(f"sparse_block_size must be >= 0, got {self.sparse_block_size}")
        if self.sparse and self.sparsity_type in ("norm", "lsh") and self.sparsity_factor > 1:
            chunk = min(self.block_size, self.sparse_block_size)
            if self.block_size % chunk or chunk % self.sparsity_factor:
                raise LSGConfigError(
                    f"sparsity_type {self.sparsity_type!r} selects inside chunks of min(block_size, sparse_block_size)"
                    f" = {chunk} tokens: it must divide block_size ({self.block_size}) and be divisible by"
                    f" sparsity_factor ({self.sparsity_factor})"
                )
        if self.sparse_windows not in SPARSE_WINDOWS:
            raise LSGConfigError(
                f"unknown sparse_windows {self.sparse_windows!r}; choose one of {', '.join(SPARSE_WINDOWS)}"
            )
        r = self.block_size // self.sparsity_factor
        if self.sparse_windows == "original" and self.sparse and r % 2 and r > 1:
            raise LSGConfigError(
                f"sparse_windows 'original' with block_size / sparsity_factor = {r} (odd, > 1): the original code"
                " cannot run these settings (it builds one sparse window too few); use sparse_windows 'intended'"
            )

    @property
    def sparse(self) -> bool:
        """Whether blocks also attend to the compressed (sparse) sequence."""
        return self.sparse_block_size > 0 and self.sparsity_type != "none"

    @property
    def keys_per_block(self) -> int:
        return self.num_global_tokens + 3 * self.block_size + (2 * self.sparse_block_size if self.sparse else 0)

    @classmethod
    def from_config(cls, config) -> LSGSpec:
        return cls(
            block_size=config.block_size,
            sparse_block_size=config.sparse_block_size,
            sparsity_factor=config.sparsity_factor,
            sparsity_type=config.sparsity_type,
            num_global_tokens=config.num_global_tokens,
            lsh_num_pre_rounds=config.lsh_num_pre_rounds,
            sparse_windows=getattr(config, "sparse_windows", "intended"),  # older configs lack the key
        )


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, min(n, 64) + 1) if n % k == 0]


# ---------------------------------------------------------------------------------------------
# Sparse selectors: (q, k, v, mask, spec) -> (k_c, v_c, mask_c)
#   q, k, v: [b, h, t, d] ordinary tokens only (no globals); t is a multiple of block_size
#   mask:    [b, t] bool, True = real token
#   returns  k_c, v_c: [b, h, t/f, d]; mask_c: [b, 1 or h, t/f] bool
# Only the set of compressed keys inside each block's range matters (softmax over a set), so
# selectors are free to order keys within a chunk.
# ---------------------------------------------------------------------------------------------
Selector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LSGSpec], tuple]


def _gather_tokens(k, v, mask, idx):
    """Take tokens `idx` [b or 1, h, m] from k, v [b, h, t, d] and mask [b, t].

    Advanced indexing reads whole d-rows, which is ~2x faster than `gather` on the transposed
    (non-contiguous) views that the projections produce.
    """
    b, h = k.shape[:2]
    rows = torch.arange(b, device=k.device).view(b, 1, 1)
    heads = torch.arange(h, device=k.device).view(1, h, 1)
    return k[rows, heads, idx], v[rows, heads, idx], mask[rows, idx.expand(b, h, -1)]  # [b, h, m, d], [b, h, m]


def select_norm(q, k, v, mask, spec):
    """In chunks of min(bs, sbs) tokens keep the chunk/f keys of largest L2 norm (masked = 0)."""
    b, h, t, d = k.shape
    chunk = min(spec.block_size, spec.sparse_block_size)
    keep = chunk // spec.sparsity_factor
    with torch.no_grad():  # the selection itself carries no gradient
        # Ranked in fp32 whatever the input dtype: a bf16/fp16 norm rounds near-ties apart and picks other
        # keys than fp32 would on the same inputs (identical for fp32 inputs, as the original computes it).
        norms = k.detach().float().norm(dim=-1) * mask.unsqueeze(1)  # [b, h, t]
        idx = norms.view(b, h, t // chunk, chunk).topk(keep, dim=-1).indices  # [b, h, t/chunk, keep]
        idx = idx + torch.arange(0, t, chunk, device=k.device).view(1, 1, -1, 1)
    return _gather_tokens(k, v, mask, idx.flatten(2))  # [b, h, t/f, d]


def select_pooling(q, k, v, mask, spec):
    """Mean of each group of f consecutive tokens over its unmasked tokens."""
    b, h, t, d = k.shape
    f = spec.sparsity_factor
    weights = mask.view(b, 1, t // f, f).to(k.dtype)  # [b, 1, t/f, f]
    count = weights.sum(-1, keepdim=True)  # [b, 1, t/f, 1]
    weights = weights / count.clamp(min=1)
    k_c = torch.einsum("bxcf,bhcfd->bhcd", weights, k.view(b, h, t // f, f, d))
    v_c = torch.einsum("bxcf,bhcfd->bhcd", weights, v.view(b, h, t // f, f, d))
    return k_c, v_c, count.squeeze(-1) > 0


def select_stride(q, k, v, mask, spec):
    """Head j takes tokens f*m + (j mod f)."""
    b, h, t, d = k.shape
    f = spec.sparsity_factor
    idx = torch.arange(0, t, f, device=k.device).view(1, 1, -1) + (torch.arange(h, device=k.device) % f).view(
        1, h, 1
    )  # [1, h, t/f]
    return _gather_tokens(k, v, mask, idx)


def select_block_stride(q, k, v, mask, spec):
    """Inside each block, head j takes the bs/f tokens starting at (j * bs/f) mod bs."""
    b, h, t, d = k.shape
    bs, r = spec.block_size, spec.block_size // spec.sparsity_factor
    offsets = (torch.arange(r, device=k.device).view(1, r) + torch.arange(h, device=k.device).view(h, 1) * r) % bs
    idx = torch.arange(0, t, bs, device=k.device).view(1, -1, 1) + offsets.view(h, 1, r)  # [h, t/bs, r]
    return _gather_tokens(k, v, mask, idx.view(1, h, -1))


def select_bos_pooling(q, k, v, mask, spec):
    """Per group of f tokens, a mean weighted by softmax(q_bos . k / sqrt(d)) over unmasked tokens.

    q_bos is the query of the first ordinary token (the `<s>` token), which is what the original
    code uses (as docs/lsg.md says: the published checkpoints were trained so). Unlike
    the original, a group with no unmasked token is masked (the original's fp32 mean of the
    additive mask overflows and leaves such groups visible, so padding changed its outputs).
    """
    b, h, t, d = k.shape
    f = spec.sparsity_factor
    k_g = k.view(b, h, t // f, f, d)
    v_g = v.view(b, h, t // f, f, d)
    group_mask = mask.view(b, 1, t // f, f)
    scores = torch.einsum("bhd,bhcfd->bhcf", q[:, :, 0], k_g) / math.sqrt(d)
    scores = scores.masked_fill(~group_mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1)  # [b, h, t/f, f]
    k_c = torch.einsum("bhcf,bhcfd->bhcd", weights, k_g)
    v_c = torch.einsum("bhcf,bhcfd->bhcd", weights, v_g)
    return k_c, v_c, group_mask.any(-1)


def _lsh_round(keys, values, counts, n_buckets):
    """Hash [b, h, c, m, d] sums into n_buckets per chunk by random projections; sum per bucket."""
    b, h, c, m, d = keys.shape
    with torch.no_grad():
        if n_buckets > 1:
            proj = torch.randn(1, h, 1, d, n_buckets // 2, device=keys.device, dtype=keys.dtype)
            hashed = (F.normalize(keys, dim=-1) * counts.clamp(0, 1)) @ proj  # [b, h, c, m, n/2]
            bucket = torch.cat([hashed, -hashed], dim=-1).argmax(dim=-1, keepdim=True)  # [b, h, c, m, 1]
        else:
            bucket = torch.zeros(b, h, c, m, 1, dtype=torch.long, device=keys.device)
    out = keys.new_zeros(b, h, c, n_buckets, d)
    keys = out.scatter_add(-2, bucket.expand(-1, -1, -1, -1, d), keys)
    values = out.scatter_add(-2, bucket.expand(-1, -1, -1, -1, d), values)
    counts = counts.new_zeros(b, h, c, n_buckets, 1).scatter_add(-2, bucket, counts)
    return keys, values, counts


def select_lsh(q, k, v, mask, spec):
    """Random-projection hashing of normalised keys in chunks of min(bs, sbs); bucket means.

    Uses torch's global RNG, so `torch.manual_seed` makes it reproducible.
    """
    f = spec.sparsity_factor
    if f == spec.sparse_block_size:  # as the original: degenerate hashing falls back to bos_pooling
        return select_bos_pooling(q, k, v, mask, spec)
    b, h, t, d = k.shape
    chunk = min(spec.block_size, spec.sparse_block_size)
    weights = mask.view(b, 1, t // chunk, chunk, 1).to(k.dtype)  # [b, 1, c, chunk, 1]
    keys = k.view(b, h, t // chunk, chunk, d) * weights
    values = v.view(b, h, t // chunk, chunk, d) * weights
    counts = weights.expand(b, h, -1, -1, -1)
    for _ in range(spec.lsh_num_pre_rounds):
        keys, values, counts = _lsh_round(keys, values, counts, chunk)
    keys, values, counts = _lsh_round(keys, values, counts, chunk // f)
    denom = counts.clamp(min=1)
    mask_c = (counts > 0).view(b, h, -1)
    return (keys / denom).view(b, h, -1, d), (values / denom).view(b, h, -1, d), mask_c


def _select_identity(q, k, v, mask, spec):
    return k, v, mask.unsqueeze(1)


SPARSE_SELECTORS: dict[str, Selector] = {
    "norm": select_norm,
    "pooling": select_pooling,
    "lsh": select_lsh,
    "stride": select_stride,
    "block_stride": select_block_stride,
    "bos_pooling": select_bos_pooling,
}


def compress(q, k, v, mask, spec: LSGSpec):
    """The compressed sequence for `spec` ([b, h, t/f, d] keys/values, [b, 1|h, t/f] mask)."""
    select = _select_identity if spec.sparsity_factor == 1 else SPARSE_SELECTORS[spec.sparsity_type]
    return select(q, k, v, mask, spec)


# ---------------------------------------------------------------------------------------------
# The block pattern
# ---------------------------------------------------------------------------------------------
def sparse_offsets(spec: LSGSpec) -> tuple[list[int], list[int]]:
    """Compressed positions block `i` reads left and right, relative to `i * bs/f`; at most `sbs` each."""
    sbs, r = spec.sparse_block_size, spec.block_size // spec.sparsity_factor
    if spec.sparse_windows == "original":
        return original_sparse_offsets(sbs, r)
    return intended_sparse_offsets(sbs, r)


def intended_sparse_offsets(sbs: int, r: int) -> tuple[list[int], list[int]]:
    """docs/lsg.md: block i's local window covers compressed positions [(i-1)*r, (i+2)*r); sbs on each side."""
    return list(range(-r - sbs, -r)), list(range(2 * r, 2 * r + sbs))


def original_sparse_offsets(sbs: int, r: int) -> tuple[list[int], list[int]]:
    """The original code's sparse windows, as offsets from `i * r` (`r = bs/f` compressed per block).

    The original pads the compressed sequence on both sides, cuts it into overlapping windows of
    `6*sbs` rows (one per block, each `r` further on) and takes two runs of rows from each window
    with Python slice bounds computed from `sbs` and `r`. Those bounds can be negative (counted from
    the window's end) or cross each other (an empty run), so the rows are taken by slicing a range
    the same way. With even `r` this is the intended range exactly when `4*sbs > 3*r`; for `r == 1`
    the right run starts 2 positions early. (Odd `r > 1`: the original fails; LSGSpec refuses it.)
    """
    span, odd = 6 * sbs, r % 2  # window length; odd r shifts the bounds by one
    first = (span - r) // 2 + odd  # window i starts at compressed position i*r - first (left padding)
    edge = (span - 3 * r) // 2 + odd  # where the left run ends, and (from the window's end) the right run starts
    rows = range(span)
    left = rows[edge - sbs : edge]
    right = rows[-(edge + odd) : -(edge + odd) + sbs]  # an end bound of 0 makes this run empty
    return [row - first for row in left], [row - first for row in right]


@lru_cache(maxsize=64)
def block_index(t: int, spec: LSGSpec, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Which bank rows each block reads: index and validity, both [n_blocks, K].

    The bank is `[G globals | t tokens | t/f compressed]`. Slot order per block: globals,
    `sbs` compressed keys left of the window, `sbs` right of it, then the 3 local blocks.
    Out-of-range slots point at row 0 and are marked invalid; so are the unused sparse slots when
    `spec.sparse_windows` is "original" and the original reads fewer than `sbs` keys on a side.
    """
    # Cached across calls: build normal tensors even when first called under inference_mode, or a
    # later training step could not save them for backward.
    with torch.inference_mode(False):
        return _block_index(t, spec, device)


def _block_index(t: int, spec: LSGSpec, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    G, bs, sbs, f = spec.num_global_tokens, spec.block_size, spec.sparse_block_size, spec.sparsity_factor
    n_blocks, r, tc = t // bs, bs // f, t // f
    block = torch.arange(n_blocks).view(-1, 1)

    parts = [(torch.arange(G).expand(n_blocks, G), torch.ones(n_blocks, G, dtype=torch.bool))]
    if spec.sparse:
        for offsets in sparse_offsets(spec):  # left, then right: up to sbs slots each
            offset = torch.zeros(1, sbs, dtype=torch.long)
            used = torch.zeros(1, sbs, dtype=torch.bool)
            offset[0, : len(offsets)] = torch.tensor(offsets, dtype=torch.long)
            used[0, : len(offsets)] = True
            pos = block * r + offset  # [n_blocks, sbs] compressed positions
            parts.append((G + t + pos, used & (pos >= 0) & (pos < tc)))
    pos = (block - 1) * bs + torch.arange(3 * bs).view(1, -1)  # local token positions
    parts.append((G + pos, (pos >= 0) & (pos < t)))

    index = torch.cat([p for p, _ in parts], dim=1)
    valid = torch.cat([m for _, m in parts], dim=1)
    index = torch.where(valid, index, torch.zeros_like(index))
    return index.to(device), valid.to(device)


def _sdpa(q, k, v, mask, dropout_p):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def blocks_and_globals(q, k, v, mask: torch.Tensor, spec: LSGSpec, dropout_p: float = 0.0):
    """What every LSG kernel starts with: the inputs padded to whole blocks, and the output buffer with
    the global queries' rows filled (they attend to every key).

    q, k, v: `[b, h, n, d]`; mask: `[b, n]` bool. Returns q, k, v `[b, h, G + t, d]`, mask `[b, G + t]`,
    `t` (ordinary tokens, now a multiple of block_size) and out `[b, G + t, h, d]`, rows G.. left empty.
    """
    b, h, n, d = q.shape
    G = spec.num_global_tokens
    t = n - G
    pad = -t % spec.block_size
    if pad:  # padded keys are masked, padded queries are cut off by the kernel
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        mask = F.pad(mask, (0, pad), value=False)
        t += pad
    # Outputs go straight into one token-major buffer [b, n, h, d]: no list + cat, and the caller's
    # transpose back to [b, n, h*d] is then free.
    out = q.new_empty(b, G + t, h, d)
    out[:, :G] = _sdpa(q[:, :, :G], k, v, mask[:, None, None, :], dropout_p).transpose(1, 2)
    return q, k, v, mask, t, out


def lsg_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    spec: LSGSpec,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Local + sparse + global attention.

    Args:
        q, k, v: `[b, h, n, d]`; the first `spec.num_global_tokens` positions are global tokens.
        mask: `[b, n]`, True (or 1) where a key may be attended; None means all.
        spec: LSG settings.
        dropout_p: attention dropout (pass 0.0 in eval mode).

    Returns:
        `[b, h, n, d]`, scaled by 1/sqrt(d) as usual. Inputs with `n - G <= 2 * block_size` use
        ordinary full attention, as in the original.
    """
    b, h, n, d = q.shape
    G, bs = spec.num_global_tokens, spec.block_size
    mask = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
    t = n - G
    if t <= 2 * bs:  # short input: the local window already covers everything
        return _sdpa(q, k, v, mask[:, None, None, :], dropout_p)

    q, k, v, mask, t, out = blocks_and_globals(q, k, v, mask, spec, dropout_p)
    n_blocks = t // bs

    # The bank every block reads from: [globals | tokens | compressed].
    bank_k, bank_v, bank_mask = k, v, mask.unsqueeze(1)  # [b, h, n, d], [b, 1, n]
    if spec.sparse:
        k_c, v_c, mask_c = compress(q[:, :, G:], k[:, :, G:], v[:, :, G:], mask[:, G:], spec)
        bank_k = torch.cat([k, k_c], dim=2)  # [b, h, G + t + t/f, d]
        bank_v = torch.cat([v, v_c], dim=2)
        bank_mask = torch.cat([bank_mask.expand(-1, mask_c.shape[1], -1), mask_c], dim=2)  # [b, 1|h, N]
        del k_c, v_c  # peak memory: only the bank copies stay alive
    index, valid = block_index(t, spec, str(q.device))  # [n_blocks, K]
    K = index.shape[1]
    hm = bank_mask.shape[1]

    q_blocks = q[:, :, G:].reshape(b, h, n_blocks, bs, d)  # [b, h, blocks, bs, d] (a view)
    step = max(1, gather_budget(q.device, q.element_size()) // (b * h * K * d))
    for i in range(0, n_blocks, step):
        idx = index[i : i + step]  # [c, K]
        c = idx.shape[0]
        flat = idx.reshape(-1)
        k_blk = bank_k.index_select(2, flat).view(b, h * c, K, d)  # [b, h*c, K, d]
        v_blk = bank_v.index_select(2, flat).view(b, h * c, K, d)
        m_blk = bank_mask.index_select(2, flat).view(b, hm, c, 1, K) & valid[i : i + step].view(1, 1, c, 1, K)
        # The mask broadcasts over the bs queries of a block. It is passed even when every key is visible:
        # finding that out (`m_blk.all()`) is a host sync per chunk and layer on an accelerator, and the
        # unmasked kernel saves nothing measurable on CPU (same numbers, within 1-4% either way, 4k-16k).
        m_blk = m_blk.expand(b, h, c, 1, K).reshape(b, h * c, 1, K)  # [b, h*c, 1, K]
        q_blk = q_blocks[:, :, i : i + step].reshape(b, h * c, bs, d)
        o_blk = _sdpa(q_blk, k_blk, v_blk, m_blk, dropout_p).view(b, h, c * bs, d)
        out[:, G + i * bs : G + (i + c) * bs] = o_blk.transpose(1, 2)  # [b, c*bs, h, d]
    return out[:, :n].transpose(1, 2)  # [b, h, n, d]
