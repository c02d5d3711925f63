"""int8 inference on CPU (`--dtype int8`): linear layers with int8 weights and dynamically quantized inputs.

`quantize_int8(model)` replaces every float32 `nn.Linear` of a CPU model (the encoder's and decoder's
projections and feed-forward layers, and the language-model head unless `head=False`) by an
`Int8Linear`: its weight rounded to int8 with one scale per output channel (symmetric, `max |w| / 127`),
and at each call the input rows quantized, each row on its own scale (`max |x| / r`), so that no row's
result depends on the other rows of its batch. Everything else stays float32: embeddings, layer norms,
and the attention itself (LSG's and LongT5's kernels see float queries, keys and values; only their
projections change).

Two of torch's int8 kernels run the products (no hand-written GEMM, no `torch.ao.quantization`, which
torch 2.13 deprecates with warnings on stderr); `longsum.model.cpu` measures which is faster per row
class on this CPU, and each layer runs the one chosen for the rows it gets:
  onednn  `torch.ops.onednn.qlinear_pointwise`, the kernel torch's own x86 quantization lowers to; inputs
          quantized here, one scale per row. Fast on many rows (the encoder: AMX or VNNI tiles), but a
          call costs about 0.1 ms however few the rows, and AMX tiles are wasted on one row.
  fbgemm  fbgemm's kernels (built for AVX2 and AVX-512 servers), which quantize, multiply and scale back
          in one call: `torch.ops.quantized.linear_dynamic` for one row (the row's own range), and above one
          row `linear_with_input_q_dq_qweight_dq_output_fp32` on a fixed input scale, each row first scaled
          to max |x| = 1 (fbgemm gives all rows of a call one input scale). Its packed weights need torch's
          quantized tensors (deprecated in torch 2.13): where they fail, onednn runs everywhere.
A layer packs its weight for a kernel on first use and keeps the int8 weight only in packed form (an
encoder layer is packed for onednn only, a decoder layer for fbgemm only, where both were chosen).

`r` is 127 on CPUs whose int8 instructions sum products in 32 bits (AVX-512 VNNI, AVX-VNNI, AMX), and 63
elsewhere: plain AVX2 (and AVX-512 without VNNI) adds pairs of u8 x s8 products in 16 bits, which
saturate for inputs above 127 (oneDNN documents this, and fbgemm's `reduce_range` is the same remedy;
`activation_range` measures it on this CPU).

The results are not fp32's bit for bit: `compare` measures how far they move (docs/cpu-decoding.md).
"""

from __future__ import annotations

import functools
import warnings

import torch

from longsum.errors import describe
from longsum.model.cpu import INT8_KERNELS, ROW_CLASSES, row_class

# Quantized input rows use [-r, r] around the zero point r + 1 (uint8).
FULL_RANGE, SAFE_RANGE = 127, 63
QUANTIZE_ROWS = 4096  # weight rows rounded at a time
ONEDNN_ONLY = dict.fromkeys(ROW_CLASSES, "onednn")  # row class -> kernel, where fbgemm cannot run


@functools.cache
def int8_fails() -> str | None:
    """Why this torch cannot run `Int8Linear` (None: it can), checked once on a small layer."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    return _kernel_fails("onednn", (3,))


@functools.cache
def fbgemm_fails() -> str | None:
    """Why this torch cannot run the fbgemm kernel (None: it can), checked once on one row and on three."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "torch was built without fbgemm"
    return _kernel_fails("fbgemm", (1, 3))


def _kernel_fails(kernel: str, row_counts: tuple[int, ...]) -> str | None:
    """Why `kernel` is unusable here (None: usable): it raises (private or deprecated ops: any change is a
    reason to refuse) or its product is off by 5% or more on a small layer, for each of `row_counts`."""
    try:
        g = torch.Generator().manual_seed(0)
        layer = torch.nn.Linear(64, 24)
        quantized = Int8Linear(layer, SAFE_RANGE, dict.fromkeys(ROW_CLASSES, kernel))
        for n in row_counts:
            rows = torch.randn(n, 64, generator=g)
            with torch.no_grad():
                expected, got = layer(rows), quantized(rows)
            error = ((got - expected).norm() / expected.norm()).item()
            if not error < 0.05:
                name = "oneDNN" if kernel == "onednn" else kernel
                return f"{name}'s int8 product is off by {error:.2g} (relative)"
    except Exception as err:  # noqa: BLE001
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

    `forward`: x `[..., d_in]` -> rows `[n, d_in]` -> the kernel `kernels[row_class(n)]` chose
    (`_onednn` or `_fbgemm`, module docstring) -> `[n, d_out]` float32, scaled back, float bias added.
    `weight` is an int8 tensor on the meta device of the weight's shape: families that check a
    weight's dtype (T5's feed-forward) see int8 and leave the input alone; the values live packed.
    """

    def __init__(self, linear: torch.nn.Linear, act_range: int, kernels: dict[str, str] | None = None):
        super().__init__()
        self.in_features, self.out_features, self.act_range = linear.in_features, linear.out_features, act_range
        self.kernels = dict(kernels or ONEDNN_ONLY)  # row class -> one of INT8_KERNELS
        w = linear.weight.detach()  # [d_out, d_in]
        scale = w.abs().amax(1).float().clamp(min=torch.finfo(torch.float32).tiny) / 127  # [d_out]
        q = torch.empty(w.shape, dtype=torch.int8)  # [d_out, d_in], a few thousand rows at a time: no float copy
        for start in range(0, w.shape[0], QUANTIZE_ROWS):  # of a vocabulary-sized head
            part = slice(start, start + QUANTIZE_ROWS)
            q[part] = torch.round(w[part].float() / scale[part, None]).clamp_(-127, 127)
        # Plain attributes, not buffers: packed layouts have no storage for state_dict to read.
        self.plain: torch.Tensor | None = q  # until the first pack holds it (`packed`)
        self.packs: dict[str, object] = {}  # kernel -> its packed weight
        self.scale, self.zero_points = scale, torch.zeros_like(scale, dtype=torch.long)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty((self.out_features, self.in_features), dtype=torch.int8, device="meta")

    def packed(self, kernel: str):
        """The weight packed for `kernel`, packed on first use from the plain int8 weight or from another
        kernel's pack (each pack can give the int8 values back), so a layer holds only the forms it runs."""
        if kernel not in self.packs:
            q = self.plain if self.plain is not None else self.int8_weight()
            self.packs[kernel] = PACK[kernel](self, q)
            self.plain = None
        return self.packs[kernel]

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight `[d_out, d_in]`, from wherever it lives now."""
        if self.plain is not None:
            return self.plain
        if "fbgemm" in self.packs:
            return torch.ops.quantized.linear_unpack(self.packs["fbgemm"])[0].int_repr()
        return self.packs["onednn"].to_dense().t().contiguous()  # (oneDNN's pack is the weight transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., d_out]
        rows = x.reshape(-1, self.in_features).float()  # [n, d_in]
        out = RUN[self.kernels[row_class(rows.shape[0])]](self, rows)  # [n, d_out]
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        kernels = ", ".join(f"{cls} rows: {kernel}" for cls, kernel in self.kernels.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, inputs in [-{self.act_range}, " \
               f"{self.act_range}], {kernels}"  # fmt: skip


def _row_scales(rows: torch.Tensor) -> torch.Tensor:
    """max |x| per row `[n, 1]` (amax and amin: 2x faster than aminmax or abs().amax() on [1024, 768])."""
    return torch.maximum(rows.amax(-1, keepdim=True), rows.amin(-1, keepdim=True).neg_()).clamp_(min=1e-30)


def _onednn(layer: Int8Linear, rows: torch.Tensor) -> torch.Tensor:  # [n, d_in] -> [n, d_out]
    # Two passes over the input and one over the output besides the product: quantizing costs as much
    # as the int8 product itself on the encoder's thousands of rows when written op by op.
    top = _row_scales(rows)  # [n, 1]
    zero = layer.act_range + 1
    # x r / max|x| in [-r, r], + zero + 0.5 in [0.5, 2r + 1.5], truncated: rounded, in [1, 2r + 1]
    q = rows.mul(layer.act_range / top).add_(zero + 0.5).to(torch.uint8)  # [n, d_in]
    out = torch.ops.onednn.qlinear_pointwise(q, 1.0, zero, layer.packed("onednn"), layer.scale, layer.zero_points,
                                             None, 1.0, 0, torch.float32, "none", [], "")  # fmt: skip
    step = top / layer.act_range  # [n, 1]; out: [n, d_out]
    return out.mul_(step) if layer.bias is None else torch.addcmul(layer.bias, out, step)


def _fbgemm(layer: Int8Linear, rows: torch.Tensor) -> torch.Tensor:  # [n, d_in] -> [n, d_out]
    packed = layer.packed("fbgemm")
    if rows.shape[0] == 1:  # one row: fbgemm's own input scale (from the row's range) is this row's
        out = torch.ops.quantized.linear_dynamic(rows.contiguous(), packed, layer.act_range == SAFE_RANGE)  # [1, d_out]
        return out if layer.bias is None else out.add_(layer.bias)
    # More rows: fbgemm takes one input scale per call, so each row is scaled to max |x| = 1 and quantized on
    # the fixed scale 1/r around r + 1 (`_onednn`'s grid): no row's result depends on its batch mates,
    # and fbgemm skips its search of the input's range.
    top = _row_scales(rows)  # [n, 1]
    r = layer.act_range
    out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(rows / top, 1 / r, r + 1, packed)
    return out.mul_(top) if layer.bias is None else torch.addcmul(layer.bias, out, top)  # [n, d_out]


def _pack_onednn(layer: Int8Linear, q: torch.Tensor):
    return torch.ops.onednn.qlinear_prepack(q, None)


def _pack_fbgemm(layer: Int8Linear, q: torch.Tensor):
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors: `fbgemm_fails` steps aside
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(q, layer.scale.double(), layer.zero_points, 0)
        return torch.ops.quantized.linear_prepack(weight, None)


RUN = {"onednn": _onednn, "fbgemm": _fbgemm}
PACK = {"onednn": _pack_onednn, "fbgemm": _pack_fbgemm}
assert set(RUN) == set(PACK) == set(INT8_KERNELS)


# Whether the language-model head is quantized too (docs/cpu-decoding.md: measured both ways).
INT8_HEAD = True


def quantize_int8(model, head: bool = INT8_HEAD, kernels: dict[str, str] | None = None):
    """Replace `model`'s float32 CPU `nn.Linear` layers by `Int8Linear` (in place; returns the model).

    `head=False` keeps the language-model head (`get_output_embeddings()`) in float32. A head tied to
    the input embeddings gets its own int8 copy; the embeddings stay float32. `kernels` (row class ->
    kernel) overrides `int8_kernels()`, the measured choice. Raises RuntimeError (one line) where this
    torch has no usable int8 kernels.
    """
    if (why := int8_fails()) is not None:
        raise RuntimeError(f"int8 needs oneDNN's int8 kernels, which this torch lacks ({why}); use --dtype fp32")
    act_range, kernels = activation_range(), kernels or int8_kernels()
    skip = None if head or not hasattr(model, "get_output_embeddings") else model.get_output_embeddings()
    # (parent, name) pairs, no reference to the layers: each float32 layer is freed as soon as its int8
    # copy replaces it, so the peak is the float model plus one layer, not plus all the int8 copies.
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
              if (type(child) is torch.nn.Linear and child.weight.device.type == "cpu"
                  and child.weight.dtype == torch.float32 and child is not skip)]  # fmt: skip
    for parent, name in places:
        setattr(parent, name, Int8Linear(getattr(parent, name), act_range, kernels))
    return model


def int8_layer(model) -> Int8Linear | None:
    """`model`'s first `Int8Linear` (None: no int8 layer): its `kernels` say what each row class runs."""
    return next((m for m in model.modules() if isinstance(m, Int8Linear)), None)


def int8_kernels() -> dict[str, str]:
    """Row class -> the int8 kernel for it: what `longsum.model.cpu` measured faster on this CPU, and
    onednn everywhere (with one line) where fbgemm fails on this torch. `longsum -v` shows the choice."""
    from longsum.console import detail
    from longsum.model.cpu import kernel_choice

    if (why := fbgemm_fails()) is not None:
        from longsum.model.decoding import step_aside

        step_aside("int8 with fbgemm on few rows", f"{why}; oneDNN's int8 kernel runs every layer")
        return dict(ONEDNN_ONLY)
    choices = {cls: kernel_choice(rows) for cls, (_, _, rows) in ROW_CLASSES.items()}
    detail("int8 linear layers: " + "; ".join(f"{cls} rows {c.int8} ({c.source}: {c.int8_why})"
                                              for cls, c in choices.items()))  # fmt: skip
    return {cls: c.int8 for cls, c in choices.items()}


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
