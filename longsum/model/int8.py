"""int8 inference on CPU (`--dtype int8`): linear layers with int8 weights and dynamically quantized inputs.

`quantize_int8(model)` replaces every float32 `nn.Linear` of a CPU model (the encoder's and decoder's
projections and feed-forward layers, and the language-model head unless `head=False`) by an
`Int8Linear`: its weight rounded to int8 with one scale per output channel (symmetric, `max |w| / 127`),
and at each call the input rows quantized with one scale per row (`max |x| / r`). The product runs in
oneDNN's int8 matmul (`torch.ops.onednn.qlinear_pointwise`, the kernel torch's own x86 quantization
lowers to; no hand-written GEMM, no `torch.ao.quantization`, which torch 2.13 deprecates with warnings
on stderr). Everything else stays float32: embeddings, layer norms, and the attention itself (LSG's
and LongT5's kernels see float queries, keys and values; only their projections change).

`r` is 127 on CPUs whose int8 instructions sum products in 32 bits (AVX-512 VNNI, AVX-VNNI, AMX), and 63
elsewhere: plain AVX2 (and AVX-512 without VNNI) adds pairs of u8 x s8 products in 16 bits, which
saturate for inputs above 127 (oneDNN documents this; `activation_range` measures it on this CPU).

The results are not fp32's bit for bit: `compare` measures how far they move (docs/cpu-decoding.md).
"""

from __future__ import annotations

import functools

import torch

from longsum.errors import describe

# Quantized input rows use [-r, r] around the zero point r + 1 (uint8).
FULL_RANGE, SAFE_RANGE = 127, 63
QUANTIZE_ROWS = 4096  # weight rows rounded at a time


@functools.cache
def int8_fails() -> str | None:
    """Why this torch cannot run `Int8Linear` (None: it can), checked once on a small layer."""
    try:
        if not torch.backends.mkldnn.is_available():
            return "torch was built without oneDNN"
        g = torch.Generator().manual_seed(0)
        layer = torch.nn.Linear(64, 24)
        rows = torch.randn(3, 64, generator=g)
        with torch.no_grad():
            expected, got = layer(rows), Int8Linear(layer, SAFE_RANGE)(rows)
        error = ((got - expected).norm() / expected.norm()).item()
        if not error < 0.05:
            return f"oneDNN's int8 product is off by {error:.2g} (relative)"
    except Exception as err:  # noqa: BLE001  private ops: any change is a reason to refuse
        return describe(err)
    return None


@functools.cache
def activation_range() -> int:
    """127 where oneDNN's u8 x s8 products of this CPU sum without saturating, else 63 (measured once:
    255 x 127 summed over 64 inputs, exact on VNNI, saturated in 16 bits on plain AVX2)."""
    weight = torch.full((8, 64), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(weight, None)
    rows = torch.full((2, 64), 255, dtype=torch.uint8)
    out = torch.ops.onednn.qlinear_pointwise(rows, 1.0, 0, packed, torch.ones(8), torch.zeros(8, dtype=torch.long),
                                             None, 1.0, 0, torch.float32, "none", [], "")  # fmt: skip
    return FULL_RANGE if bool((out == 255 * 127 * 64).all()) else SAFE_RANGE


class Int8Linear(torch.nn.Module):
    """`nn.Linear` with an int8 weight (one scale per output channel) and inputs quantized per row.

    `forward`: x `[..., d_in]` -> rows `[n, d_in]`, each scaled to [-r, r] and shifted to uint8 (zero
    point r + 1); oneDNN multiplies them by the prepacked int8 weight `[d_out, d_in]` and applies the
    weight's scales (`[n, d_out]` float32); each row is scaled back and the float bias added.
    `weight` is the packed int8 weight (families that check a weight's dtype, as T5's feed-forward
    does, see int8 and leave the input alone).
    """

    def __init__(self, linear: torch.nn.Linear, act_range: int):
        super().__init__()
        self.in_features, self.out_features, self.act_range = linear.in_features, linear.out_features, act_range
        w = linear.weight.detach()  # [d_out, d_in]
        scale = w.abs().amax(1).float().clamp(min=torch.finfo(torch.float32).tiny) / 127  # [d_out]
        q = torch.empty(w.shape, dtype=torch.int8)  # [d_out, d_in], a few thousand rows at a time: no float copy
        for start in range(0, w.shape[0], QUANTIZE_ROWS):  # of a vocabulary-sized head
            part = slice(start, start + QUANTIZE_ROWS)
            q[part] = torch.round(w[part].float() / scale[part, None]).clamp_(-127, 127)
        # A plain attribute, not a buffer: oneDNN's packed layout has no storage for state_dict to read.
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.scale, self.zero_points = scale, torch.zeros_like(scale, dtype=torch.long)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    @property
    def weight(self) -> torch.Tensor:
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., d_out]
        # Two passes over the input and one over the output besides the product: quantizing costs as much
        # as the int8 product itself on the encoder's thousands of rows when written op by op.
        rows = x.reshape(-1, self.in_features).float()  # [n, d_in]
        # (amax and amin: 2x faster than aminmax or abs().amax() on [1024, 768], torch 2.13)
        top = torch.maximum(rows.amax(-1, keepdim=True), rows.amin(-1, keepdim=True).neg_()).clamp_(min=1e-30)  # [n, 1]
        zero = self.act_range + 1
        # x r / max|x| in [-r, r], + zero + 0.5 in [0.5, 2r + 1.5], truncated: rounded, in [1, 2r + 1]
        q = rows.mul(self.act_range / top).add_(zero + 0.5).to(torch.uint8)  # [n, d_in]
        out = torch.ops.onednn.qlinear_pointwise(q, 1.0, zero, self.packed, self.scale, self.zero_points, None, 1.0,
                                                 0, torch.float32, "none", [], "")  # fmt: skip
        step = top / self.act_range  # [n, 1]; out: [n, d_out]
        out = out.mul_(step) if self.bias is None else torch.addcmul(self.bias, out, step)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, inputs in [-{self.act_range}, " \
               f"{self.act_range}]"  # fmt: skip


# Whether the language-model head is quantized too (docs/cpu-decoding.md: measured both ways).
INT8_HEAD = True


def quantize_int8(model, head: bool = INT8_HEAD):
    """Replace `model`'s float32 CPU `nn.Linear` layers by `Int8Linear` (in place; returns the model).

    `head=False` keeps the language-model head (`get_output_embeddings()`) in float32. A head tied to
    the input embeddings gets its own int8 copy; the embeddings stay float32. Raises RuntimeError
    (one line) where this torch has no usable int8 kernels.
    """
    if (why := int8_fails()) is not None:
        raise RuntimeError(f"int8 needs oneDNN's int8 kernels, which this torch lacks ({why}); use --dtype fp32")
    act_range = activation_range()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is torch.nn.Linear and child.weight.device.type == "cpu"
                    and child.weight.dtype == torch.float32 and (head or child is not output)):  # fmt: skip
                setattr(parent, name, Int8Linear(child, act_range))
    return model


def is_int8(model) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def compare(reference, quantized, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            **generate_kwargs) -> dict:  # fmt: skip
    """How far `quantized`'s results move from `reference`'s (the same model in fp32) on a batch.

    Both decode with stock `generate` (`generate_kwargs`); then both score the reference's summaries
    with teacher forcing, step by step. Returns `logit_rel_error` (median over steps of
    |z_q - z| / |z| per step), `logit_rel_error_max`, `top1_agreement` (share of steps whose argmax
    agree), `steps`, and `identical_summaries` (share of documents whose ids are equal).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        ref = reference.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        got = quantized.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        same = [a.tolist() == b.tolist() for a, b in zip(ref, got)]
        decoder_input = ref[:, :-1]  # [b, L-1]: the reference's tokens, fed to both
        z = reference(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input).logits
        zq = quantized(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input).logits
    pad = reference.generation_config.pad_token_id
    keep = (ref[:, 1:] != pad) if pad is not None else torch.ones_like(ref[:, 1:], dtype=torch.bool)  # [b, L-1]
    z, zq = z[keep], zq[keep]  # [steps, V]
    error = (zq - z).norm(dim=-1) / z.norm(dim=-1)
    return {"steps": int(z.shape[0]), "logit_rel_error": error.median().item(),
            "logit_rel_error_max": error.max().item(),
            "top1_agreement": (zq.argmax(-1) == z.argmax(-1)).float().mean().item(),
            "identical_summaries": sum(same) / len(same)}  # fmt: skip
