"""LongT5 encoder attention, exact and in bounded chunks: transformers' local and transient-global
attention with the same parameters and the same numbers, without their full-sequence intermediates.

transformers' LongT5 materializes, for the whole sequence at once and in every layer, the scores,
the position bias plus mask and the attention weights `[b, blocks, h, block, 3*block + n/g]`, the
transient-global side keys tiled once per block, and the global aggregates as a one-hot einsum
`[b, n, n/g]` (at 16k tokens, base size: ~16 s and ~6.5 GB per layer on one CPU thread). Here:

* Layer 0 computes what every layer shares once, compactly (`Shared`): the relative-position bias
  `[h, block, 3*block]` (the same for every block), the local mask `[b, blocks, block, 3*block]`
  (bool), and for transient-global the token -> global-block ids and the side bias of a query in
  each global block `[G + 1, h, G]` (G = n // global_block_size; the bias depends only on the
  query's global block). It travels to the other layers in the `position_bias` slot, as the stock
  tensor does.
* Query blocks are processed in chunks (`CHUNK_BYTES` of mask each on CPU, `DEVICE_CHUNK_BYTES`
  elsewhere): a chunk writes its 3-block keys/values (a strided view of the padded keys) next to
  the side keys/values (written once per layer when autograd is off), builds its additive mask
  (bias + -1e10 where masked, exactly the stock sum; on CPU, one shared `[h, block, 3*block]` mask
  for chunks of interior blocks, see `skips_interior_masks`) and calls SDPA with `scale=1.0` (T5
  does not scale scores). No whole-sequence score tensor exists, and no step reads tensor values
  on the host outside CPU (no device sync per chunk or layer).
* Global aggregates are sums over fixed blocks (`index_add_`), not a one-hot einsum.

`LocalAttention` / `TransientGlobalAttention` inherit the stock modules one level and override
`forward` only, so checkpoints load unchanged (`q/k/v/o`, `relative_attention_bias`,
`global_relative_attention_bias`, `global_input_layer_norm`); `use_longsum_attention(model)`
switches a loaded model's encoder attention modules to them (`load_model` does, unless
`attention="stock"`). Attention weights (`output_attentions=True`) come from the stock forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.longt5 import modeling_longt5 as stock

from longsum.errors import describe

CHUNK_BYTES = 32 << 20  # on CPU: the additive mask of one chunk of query blocks (its keys/values are similar)
# On any other device (CUDA...): cache sizes do not matter there, kernel launches and filling the SMs do. At
# base size (h 12, blocks of 128) one block's mask is 2.4 MB local and ~8.6 MB transient-global at 16k
# tokens (1024 side keys), so 256 MiB holds ~100 / ~30 blocks: SDPA calls over >= ~350 (block, head)
# tiles, 2 / 5 chunks per layer at 16k, and mask + keys + values stay under ~1 GB in fp32 at any length.
DEVICE_CHUNK_BYTES = 256 << 20
MASKED = -1e10  # what transformers' LongT5 (after the original) adds where attention is masked


@dataclass
class Shared:
    """Computed by the first layer, reused by all (shapes: b batch, nb blocks, bl block, h heads)."""

    bias: torch.Tensor  # [h, bl, 3*bl] relative-position bias (zeros for a layer without a table)
    allowed: torch.Tensor | None  # [b, nb, bl, 3*bl] bool: padding and locality; None: all (stock: no mask)
    block_ids: torch.Tensor | None = None  # [b, n] int: each token's global block (-1: padding)
    segments: torch.Tensor | None = None  # [b, G] int: 1 where the global block holds tokens
    token_mask: torch.Tensor | None = None  # [b, n] the attention mask (1 token, 0 padding)
    side_rows: torch.Tensor | None = None  # [G + 1, h, G] side bias of a query in global block j - 1
    visibility: torch.Tensor | None = None  # [b, 2, G] 0 / -1e10: global blocks seen by a query of mask 0 / 1


def _pad_blocks(x: torch.Tensor, bl: int, nb: int) -> torch.Tensor:
    """[b, n, h, d] -> [b, (nb + 2) * bl, h, d]: zeros before, and after up to whole blocks plus one
    block (the stock `_split_into_blocks` + `_concatenate_3_blocks` zero padding)."""
    n = x.shape[1]
    return F.pad(x, (0, 0, 0, 0, bl, (nb + 1) * bl - n))


def _three_blocks(padded: torch.Tensor, i0: int, i1: int, bl: int) -> torch.Tensor:
    """Keys/values of query blocks i0..i1: [b, C, h, 3*bl, d] (block i sees blocks i-1, i, i+1)."""
    window = padded[:, i0 * bl : (i1 + 2) * bl]  # [b, (C + 2) * bl, h, d]
    return window.unfold(1, 3 * bl, bl).permute(0, 1, 2, 4, 3)  # [b, C, h, d, 3bl] -> [b, C, h, 3bl, d]


def _locality(bl: int, device) -> torch.Tensor:
    """[bl, 3*bl] bool: query i of a block may see key j of its 3 blocks when |j - bl - i| < bl."""
    offsets = torch.arange(3 * bl, device=device)[None, :] - bl - torch.arange(bl, device=device)[:, None]
    return offsets.abs() < bl


def _chunk_bytes(device: torch.device) -> int:
    """The mask bytes of one chunk of query blocks on `device` (see CHUNK_BYTES, DEVICE_CHUNK_BYTES)."""
    return CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES


def _chunk_blocks(b: int, h: int, bl: int, keys: int, itemsize: int, device: torch.device) -> int:
    return max(1, _chunk_bytes(device) // max(1, b * h * bl * keys * itemsize))


def skips_interior_masks(device: torch.device) -> bool:
    """Whether a chunk of interior blocks (no padding in reach) uses the one shared [h, bl, 3bl] mask.

    Telling interior chunks apart compares masks on the host (`torch.equal` -> a bool): free on CPU,
    where the shared mask saves building the [b, C, h, bl, 3bl] one (~7% of a 16k transient-global
    layer on one thread), but a device-to-host sync per chunk and layer on an accelerator, whose large
    chunks (`DEVICE_CHUNK_BYTES`) nearly always reach a sequence end (masked) anyway. Chosen once per
    call from the device.
    """
    return device.type == "cpu"


class _BlockedAttention:
    """The shared forward: chunks of query blocks, each one SDPA call over [3 blocks | side keys]."""

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.n_heads, self.key_value_proj_dim)  # [b, n, h, d]

    def _local_bias(self, dtype) -> torch.Tensor:
        if self.has_relative_attention_bias:
            return self.compute_bias(self.block_len)[0, 0]  # [h, bl, 3bl]
        return torch.zeros(self.n_heads, self.block_len, 3 * self.block_len, device=self.q.weight.device, dtype=dtype)

    def _attend(self, hidden_states, shared: Shared, side_k=None, side_v=None) -> torch.Tensor:
        """[b, n, d_model] -> attention output before `o`, [b, n, h*d]."""
        b, n, _ = hidden_states.shape
        bl, h = self.block_len, self.n_heads
        nb = -(-n // bl)
        q = self._heads(self.q(hidden_states))
        k = _pad_blocks(self._heads(self.k(hidden_states)), bl, nb)  # [b, (nb+2)*bl, h, d]
        v = _pad_blocks(self._heads(self.v(hidden_states)), bl, nb)
        q = F.pad(q, (0, 0, 0, 0, 0, nb * bl - n)).view(b, nb, bl, h, -1)  # [b, nb, bl, h, d]
        G = 0 if side_k is None else side_k.shape[1]
        step = min(nb, _chunk_blocks(b, h, bl, 3 * bl + G, q.element_size(), q.device))
        bias = shared.bias.to(q.dtype)  # [h, bl, 3bl]
        skip_interior = shared.allowed is not None and skips_interior_masks(q.device)
        if skip_interior:  # interior blocks (no padding in reach) all have the same mask: the bias where |i - j| < bl
            locality = _locality(bl, q.device)  # [bl, 3bl]
            interior = bias + torch.where(locality, 0.0, MASKED).to(q.dtype)  # [h, bl, 3bl]
        dropout = self.dropout if self.training else 0.0
        # Without autograd a chunk's key/value/mask buffers are reused, and the side keys/values
        # (the same for every block) are written into them once; with autograd each chunk gets its own.
        reuse, buffers = not torch.is_grad_enabled(), None
        outputs = []
        for i0 in range(0, nb, step):
            i1 = min(nb, i0 + step)
            C = i1 - i0
            local_k, local_v = _three_blocks(k, i0, i1, bl), _three_blocks(v, i0, i1, bl)  # [b, C, h, 3bl, d]
            # The local part of the mask, [b, C, h, bl, 3bl]: the bias plus -1e10 where not allowed.
            allowed = None if shared.allowed is None else shared.allowed[:, i0:i1]  # [b, C, bl, 3bl]
            if skip_interior and torch.equal(allowed, locality.expand_as(allowed)):
                local_mask, masked = interior.expand(b, C, h, bl, 3 * bl), None  # one [h, bl, 3bl] mask for all
            else:
                local_mask = bias.expand(b, C, h, bl, 3 * bl)
                masked = None if allowed is None else torch.where(allowed, 0.0, MASKED).to(q.dtype).unsqueeze(2)
            if not G:
                keys, values = local_k, local_v
                mask = local_mask if masked is None else local_mask + masked  # [b, C, h, bl, 3bl]
            else:
                if buffers is None or not reuse or C != buffers[0].shape[1]:
                    buffers = self._chunk_buffers(b, C, 3 * bl + G, q, side_k, side_v)
                keys, values, mask = buffers  # [b, C, h, 3bl + G, d] x2, [b, C, h, bl, 3bl + G]
                keys[..., : 3 * bl, :].copy_(local_k)
                values[..., : 3 * bl, :].copy_(local_v)
                mask[..., : 3 * bl].copy_(local_mask)
                if masked is not None:  # the same sum as bias + masked, made in the buffer (no temporary)
                    mask[..., : 3 * bl].add_(masked)  # [b, C, 1, bl, 3bl] over the heads
                self._side_bias(shared, i0 * bl, i1 * bl, n, mask[..., 3 * bl :])
            query = q[:, i0:i1].permute(0, 1, 3, 2, 4)  # [b, C, h, bl, d]
            out = F.scaled_dot_product_attention(
                query.reshape(b * C, h, bl, -1), keys.reshape(b * C, h, 3 * bl + G, -1),
                values.reshape(b * C, h, 3 * bl + G, -1), attn_mask=mask.reshape(b * C, h, bl, 3 * bl + G),
                dropout_p=dropout, scale=1.0)  # fmt: skip
            outputs.append(out.view(b, C, h, bl, -1).permute(0, 1, 3, 2, 4).reshape(b, C * bl, -1))  # [b, C*bl, h*d]
        return torch.cat(outputs, dim=1)[:, :n]

    @staticmethod
    def _chunk_buffers(b: int, C: int, keys: int, q, side_k, side_v):
        """Key/value buffers [b, C, h, 3bl + G, d] with the side keys/values in place, and a mask buffer."""
        h, bl, d = q.shape[3], q.shape[2], q.shape[4]
        G = side_k.shape[1]
        key_buffer, value_buffer = q.new_empty(b, C, h, keys, d), q.new_empty(b, C, h, keys, d)
        key_buffer[..., keys - G :, :].copy_(side_k.permute(0, 2, 1, 3).unsqueeze(1).expand(b, C, h, G, d))
        value_buffer[..., keys - G :, :].copy_(side_v.permute(0, 2, 1, 3).unsqueeze(1).expand(b, C, h, G, d))
        return key_buffer, value_buffer, q.new_empty(b, C, h, bl, keys)


class LocalAttention(_BlockedAttention, stock.LongT5LocalAttention):
    """LongT5 local attention (blocks of local_radius + 1 tokens see the previous, own and next block)."""

    def forward(self, hidden_states, mask=None, position_bias=None, output_attentions=False):
        if output_attentions or (position_bias is not None and not isinstance(position_bias, Shared)):
            return super().forward(hidden_states, mask, position_bias, output_attentions)
        if position_bias is None:  # the first layer; `mask` is the stack's [b, 1, nb, bl, 3bl] local mask
            position_bias = Shared(self._local_bias(hidden_states.dtype), None if mask is None else mask[:, 0] > 0)
        return self.o(self._attend(hidden_states, position_bias)), position_bias


class TransientGlobalAttention(_BlockedAttention, stock.LongT5TransientGlobalAttention):
    """LongT5 transient-global attention: local attention plus side keys, one per block of
    `global_block_size` tokens (their layer-normed sums), with their own relative bias."""

    def forward(self, hidden_states, mask=None, position_bias=None, output_attentions=False):
        if output_attentions or (position_bias is not None and not isinstance(position_bias, Shared)):
            return super().forward(hidden_states, mask, position_bias, output_attentions)
        b, n, _ = hidden_states.shape
        if position_bias is None:  # the first layer; `mask` is the [b, n] attention mask
            position_bias = self._shared(mask, b, n, hidden_states)
        shared = position_bias
        G = shared.segments.shape[1]
        side_k = side_v = None
        if G:
            ids = torch.where(shared.block_ids >= 0, shared.block_ids, G).long()  # padding -> a spare row
            ids = ids + torch.arange(b, device=ids.device).unsqueeze(1) * (G + 1)  # [b, n] rows of [b*(G+1)]
            sums = hidden_states.new_zeros(b * (G + 1), hidden_states.shape[-1])
            sums.index_add_(0, ids.flatten(), hidden_states.reshape(b * n, -1))
            aggregates = self.global_input_layer_norm(sums.view(b, G + 1, -1)[:, :G])  # [b, G, d_model]
            side_k, side_v = self._heads(self.k(aggregates)), self._heads(self.v(aggregates))  # [b, G, h, d]
        return self.o(self._attend(hidden_states, shared, side_k, side_v)), shared

    def _shared(self, mask, b: int, n: int, hidden_states) -> Shared:
        device = hidden_states.device
        if mask is None:
            mask = torch.ones(b, n, device=device)
        # transformers' helpers build small index tensors with default-device factories and copy them over:
        # made on `device` here, with the same values, instead of a host-to-device copy (a sync on CUDA) each.
        with torch.device(device):
            block_ids, segments = stock._make_global_fixed_block_ids(mask, self.global_block_size)
            allowed = stock._get_local_attention_mask(mask, self.block_len, device)[:, 0] > 0  # [b, nb, bl, 3bl]
        G = segments.shape[1]
        side_rows = visibility = None
        if G:
            relative = torch.arange(-(G - 1), G + 1, device=device)  # every g - block_id (block_id >= -1)
            buckets = self._relative_position_bucket(relative, bidirectional=not self.is_decoder,
                                                     num_buckets=self.relative_attention_num_buckets,
                                                     max_distance=self.relative_attention_max_distance)  # fmt: skip
            table = self.global_relative_attention_bias(buckets)  # [2G, h]: bias of g - block_id = r - (G - 1)
            # Row j (block id j - 1) holds the bias to every global block g: index g - (j - 1) + G - 1.
            index = torch.arange(G, device=device)[None, :] - torch.arange(G + 1, device=device)[:, None] + G
            side_rows = table[index].permute(0, 2, 1).contiguous()  # [G + 1, G, h] -> [G + 1, h, G]
            seen = torch.stack([segments == 0, segments == 1], dim=1)  # [b, 2, G]
            visibility = torch.where(seen, 0.0, MASKED)
        return Shared(self._local_bias(hidden_states.dtype), allowed, block_ids.long(), segments, mask, side_rows,
                      visibility)  # fmt: skip

    def _side_bias(self, shared: Shared, start: int, stop: int, n: int, out: torch.Tensor) -> None:
        """Write the side part of the mask for query positions start..stop into `out` [b, C, h, bl, G]:
        each query's row of side bias (by its global block) plus -1e10 where a global block is not
        visible (a query sees the global blocks whose segment id equals its own mask value)."""
        b, C, h, bl, G = out.shape
        end = min(stop, n)
        P = end - start
        rows = shared.side_rows.index_select(0, (shared.block_ids[:, start:end] + 1).flatten())  # [b*P, h, G]
        batch = torch.arange(b, device=out.device)[:, None]
        visible = shared.visibility[batch, shared.token_mask[:, start:end].long()]  # [b, P, G]
        side = (rows.view(b, P, h, G) + visible.unsqueeze(2)).to(out.dtype)  # [b, P, h, G]
        if P < C * bl:  # query rows past the sequence (dropped at the end): the stock pads them with 0
            side = F.pad(side, (0, 0, 0, 0, 0, C * bl - P))
        out.copy_(side.view(b, C, bl, h, G).permute(0, 1, 3, 2, 4))


ATTENTION_CLASSES = {stock.LongT5LocalAttention: LocalAttention,
                     stock.LongT5TransientGlobalAttention: TransientGlobalAttention}  # fmt: skip


def use_longsum_attention(model) -> int:
    """Switch a LongT5 model's encoder attention modules to longsum's (same parameters); returns how many.

    When longsum's attention does not reproduce this transformers' LongT5 (`differs`: a release that
    changed the stock modules), the model keeps the stock modules and one stderr line says why.
    """
    modules = [module for module in model.modules() if type(module) in ATTENTION_CLASSES]
    for kind in {type(module) for module in modules}:
        if (why := differs(kind)) is not None:
            from longsum.model.decoding import step_aside

            step_aside("longsum's LongT5 attention", f"{why} (transformers' own modules)")
            return 0
    for module in modules:
        module.__class__ = ATTENTION_CLASSES[type(module)]
    return len(modules)


@functools.cache
def differs(kind: type) -> str | None:
    """Why longsum's version of the stock attention class `kind` does not give the stock numbers on
    this transformers (None: it does), checked once on a tiny padded two-layer encoder (~10 ms)."""
    from transformers import LongT5Config, LongT5EncoderModel

    attention_type = "local" if kind is stock.LongT5LocalAttention else "transient-global"
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(0)
            config = LongT5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, local_radius=3,
                                  global_block_size=3, encoder_attention_type=attention_type, dropout_rate=0.0)  # fmt: skip
            encoder = LongT5EncoderModel(config).eval()
            ids = torch.randint(1, 40, (2, 23))
            mask = torch.ones_like(ids)
            mask[1, 15:] = 0  # padding in reach of blocks
            with torch.no_grad():
                want = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                for module in encoder.modules():
                    if type(module) is kind:
                        module.__class__ = ATTENTION_CLASSES[kind]
                got = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                return f"its {attention_type} attention gives other numbers than {kind.__name__} here"
    except Exception as err:  # noqa: BLE001  any change is a reason to step aside
        return describe(err)
    return None
