"""What every LSG model shares, written once as mixins and helpers.

A family file (`bart.py`, `mbart.py`, `pegasus.py`) combines these mixins with the stock
transformers classes one level deep. Only these things change from the stock model:

* the config carries the LSG keys (`LSGConfigMixin`);
* encoder self-attention runs an LSG kernel on the stock projections (`LSGSelfAttention`, the one
  attention forward of every family; `LSGAttentionMixin` names the BART-like projections, and
  `bert.LSGSelfAttentionMixin` the BERT-like ones);
* the encoder embedding step prepends global tokens, pads to whole blocks and trims the output
  (`LSGEncoderMixin`), and the seq2seq model gives the decoder a cross-attention mask that matches
  (`LSGSeq2SeqModelMixin`);
* a call without `attention_mask` masks the padding of `input_ids` (`LSGSeq2SeqModelMixin` for
  `forward`, `LSGGenerationMixin` for `generate`), as the original models did under transformers 4.

The decoder is the stock one. The encoder-only families (`bert.py`, `roberta.py`) share the config
mixin, the attention forward, `build_once`, `key_mask`, `check_length` and
`warn_no_attention_weights`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from longsum.errors import InputTooLongError
from longsum.model.lsg.attention import LSGSpec, intended_sparse_offsets, original_sparse_offsets
from longsum.model.lsg.kernels import select_kernel
from longsum.registry import LSG_DEFAULTS, MAX_GLOBAL_TOKENS  # noqa: F401  (re-exported)


class LSGConfigMixin:
    """Adds the LSG keys (with docs/lsg.md defaults) to a stock config and validates them."""

    def __post_init__(self, **kwargs):
        for key, default in LSG_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        kwargs.pop("auto_map", None)  # never point at checkpoint code
        super().__post_init__(**kwargs)
        if self.sparsity_type is None:
            self.sparsity_type = "none"
        if self.mask_first_token and not self.pool_with_global:
            self.pool_with_global = True  # as the original: token 0 is hidden, so it is pooled from global 0
        LSGSpec.from_config(self)  # raises LSGConfigError on a bad setting


def needs_original_windows(config) -> bool:
    """Whether the original LSG code reads other sparse windows than docs/lsg.md's with these settings.

    With `r = block_size / sparsity_factor`, that is when sparse attention is on and either `r` is
    even with `4 * sparse_block_size <= 3 * r` (e.g. 128/32/2, 64/16/2: blocks read compressed keys
    from inside their own local window, one side only, or none), or `r == 1` (block_size ==
    sparsity_factor: the right window starts 2 positions early). Odd `r > 1` gives False: the
    original cannot run it, so no checkpoint was trained with it. `config`: a config or its dict;
    missing keys take the LSG defaults.
    """
    if isinstance(config, Mapping):
        settings = {key: config.get(key, default) for key, default in LSG_DEFAULTS.items()}
    else:
        settings = {key: getattr(config, key, default) for key, default in LSG_DEFAULTS.items()}
    bs, sbs, f = settings["block_size"], settings["sparse_block_size"], settings["sparsity_factor"]
    if not sbs or settings["sparsity_type"] in (None, "none") or f < 1 or bs % f:
        return False  # no sparse keys (or settings longsum refuses anyway)
    r = bs // f
    if r % 2 and r > 1:
        return False
    return original_sparse_offsets(sbs, r) != intended_sparse_offsets(sbs, r)


def build_once(init):
    """Decorator for an LSG model's `__init__`: every part is allocated and initialised once.

    Why: the stock `__init__`s build their children before the LSG classes replace them, so a
    model built for real allocated and initialised its encoder several times. The `__init__` runs
    on the meta device, then the finished model gets storage once (`to_empty`) and transformers'
    `init_weights` (as `from_pretrained`, which builds on meta too). Nested LSG models and
    `from_pretrained` leave this to the outermost call; under DeepSpeed ZeRO-3 (`zero.Init`
    partitions parameters as they are created) the `__init__` runs as it is.
    """

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        device = torch.get_default_device()
        if device.type == "meta" or is_deepspeed_zero3_enabled():
            return init(self, *args, **kwargs)
        with torch.device("meta"):
            init(self, *args, **kwargs)
        self.to_empty(device=device)  # ties do not survive this: tied copies get storage of their own
        for key in self.all_tied_weights_keys:  # those copies are replaced by their source when init_weights
            self.get_parameter(key)._is_hf_initialized = True  # ties: skip drawing them (as from_pretrained does)
        self.init_weights()

    return wrapper


def check_key_mask(attention_mask: torch.Tensor | None, hidden_states: torch.Tensor) -> None:
    """LSG attention takes a boolean key mask `[b, n]` (True = visible), as `key_mask` builds it.

    A stock encoder forward passes 4-D or additive float masks instead; `lsg_attention` would
    misread those (an additive mask's 0 means visible, its `.bool()` means masked), so refuse them.
    """
    if attention_mask is None:
        return
    if attention_mask.dtype != torch.bool or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"LSG self-attention expects a boolean key mask [batch, tokens] = {list(hidden_states.shape[:2])},"
            f" got {attention_mask.dtype} {list(attention_mask.shape)}"
        )


class LSGSelfAttention:
    """Encoder self-attention through an LSG kernel on the stock projections: one forward for all families.

    Mixed in front of a stock attention class, whose `__init__` builds the projections under their
    stock names (so stock checkpoints load). What differs between the two hierarchies is only what
    differs between the stock classes, and each hierarchy states it in three small methods:

    * `project(x)`: the stock q / k / v linear layers (`q_proj`... in BART-like models, `query`... in
      BERT-like ones);
    * `output(x)`: the stock output projection where the attention module applies it (`out_proj`);
      BERT's is applied outside, by `BertSelfOutput` (dense + dropout + LayerNorm on the residual);
    * `attention_dropout()`: the stock attention-dropout probability (a float attribute in BART, an
      `nn.Dropout` in BERT), read at each call so that changing it on a built model takes effect.

    The kernel is chosen once, here, from `config._attn_implementation` (`kernels.select_kernel`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lsg_spec = LSGSpec.from_config(self.config)
        self.lsg_kernel = select_kernel(self.config)
        # The encoder's heads: BART-like configs map `num_attention_heads` to `encoder_attention_heads`.
        self.lsg_heads = self.config.num_attention_heads

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def output(self, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention_dropout(self) -> float:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """hidden_states [b, n, d_model]; attention_mask [b, n] bool key mask (globals first)."""
        check_key_mask(attention_mask, hidden_states)
        b, n, _ = hidden_states.shape
        q, k, v = self.project(hidden_states)  # [b, n, h*d] each
        q, k, v = (x.view(b, n, self.lsg_heads, -1).transpose(1, 2) for x in (q, k, v))  # [b, h, n, d]
        dropout = self.attention_dropout() if self.training else 0.0
        out = self.lsg_kernel(q, k, v, attention_mask, self.lsg_spec, dropout)  # [b, h, n, d]
        out = out.transpose(1, 2).reshape(b, n, -1)  # [b, n, h*d]
        return self.output(out), None  # no attention weights are formed (see warn_no_attention_weights)


class LSGAttentionMixin(LSGSelfAttention):
    """LSG self-attention on the BART-like stock attention (BART, mBART, Pegasus)."""

    def project(self, hidden_states):
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    def output(self, context):
        return self.out_proj(context)

    def attention_dropout(self) -> float:
        return self.dropout  # a float in the stock BART-like attention


_WARNED: set[str] = set()

NO_ATTENTION_WEIGHTS = (
    "LSG encoder attention forms no attention weights (each block's softmax runs inside SDPA), so the LSG encoder"
    " returns no attentions (an empty tuple); a decoder's self- and cross-attentions are still returned"
    " (with attn_implementation='eager')"
)


def warn_no_attention_weights(config, kwargs: Mapping) -> None:
    """Warn once per process when a caller asks an LSG encoder for attention weights.

    A warning, not an error: `output_attentions=True` (on the model, on `generate`, or in the config)
    also asks the decoder for its self- and cross-attentions, which are still returned. The request
    is read as transformers' `capture_outputs` reads it: the call's value, else the config's.
    """
    if not kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        return
    if "attentions" not in _WARNED:
        _WARNED.add("attentions")
        warnings.warn(NO_ATTENTION_WEIGHTS, UserWarning, stacklevel=2)


class LSGEncoderMixin:
    """Global tokens, whole blocks and output trimming around the stock encoder layers.

    Subclasses define `embed(input_ids, inputs_embeds) -> [b, t, d]` (tokens + positions, as the
    stock encoder does before its normalisation) and `layer_class` (the LSG encoder layer).
    `layernorm_embedding` (BART, mBART) and `layer_norm` (mBART, Pegasus) are used when present.
    """

    layer_class: type[nn.Module]

    @build_once
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.layers = nn.ModuleList([self.layer_class(config, layer_idx=i) for i in range(config.encoder_layers)])
        self.global_embeddings = nn.Embedding(MAX_GLOBAL_TOKENS, config.d_model)
        self.post_init()

    def cross_attention_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The decoder's mask over this encoder's output (a new tensor; the input is untouched)."""
        if attention_mask is None:
            return None
        config = self.config
        if config.mask_first_token:  # the original masks token 0 for cross-attention too
            attention_mask = attention_mask.clone()
            attention_mask[:, 0] = 0
        if config.pass_global_tokens_to_decoder:
            attention_mask = F.pad(attention_mask, (config.num_global_tokens, 0), value=1)
        return attention_mask

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs) -> BaseModelOutput:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        config = self.config
        warn_no_attention_weights(config, kwargs)
        G, bs = config.num_global_tokens, config.block_size
        b, t = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        check_length(t, config.max_position_embeddings, bs)

        hidden = self.embed(input_ids, inputs_embeds)  # [b, t, d]
        glob = self.global_embeddings.weight[:G].to(hidden.dtype).expand(b, G, -1)  # [b, G, d]
        hidden = torch.cat([glob, hidden], dim=1)  # [b, G + t, d]
        if getattr(self, "layernorm_embedding", None) is not None:
            hidden = self.layernorm_embedding(hidden)
        hidden = F.dropout(hidden, p=self.dropout, training=self.training)

        mask, pad = key_mask(attention_mask, b, t, config, hidden.device)  # [b, G + t + pad]
        hidden = F.pad(hidden, (0, 0, 0, pad))

        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue  # LayerDrop
            hidden = layer(hidden, mask, **kwargs)
        if getattr(self, "layer_norm", None) is not None:
            hidden = self.layer_norm(hidden)

        hidden = hidden[:, : G + t]  # [b, G + t, d]
        if not config.pass_global_tokens_to_decoder:
            first = hidden[:, :1] if config.pool_with_global else hidden[:, G : G + 1]  # token 0 <- global 0
            hidden = torch.cat([first, hidden[:, G + 1 :]], dim=1)  # [b, t, d]
        return BaseModelOutput(last_hidden_state=hidden)


def padding_mask(input_ids, pad_token_id, eos_token_id=None) -> torch.Tensor | None:
    """`input_ids != pad_token_id` ([b, t] long), or None when padding cannot be told apart.

    None without integer ids (e.g. `inputs_embeds`), without a pad id, or when the pad id is also
    the end-of-text id: the same rule as transformers 4's `generate`, under which the original LSG
    checkpoints were used.
    """
    if input_ids is None or input_ids.dim() != 2 or input_ids.is_floating_point() or pad_token_id is None:
        return None
    eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if pad_token_id in eos:
        return None
    return input_ids.ne(pad_token_id).long()


class LSGSeq2SeqModelMixin:
    """Runs the LSG encoder, then the stock forward with the matching cross-attention mask.

    Without `attention_mask`, the mask is built from `input_ids != pad_token_id` (see
    `padding_mask`): transformers 5 no longer builds one for encoder-decoder models, and without it
    padded rows would attend to their padding and `mask_first_token` would not reach the decoder.
    """

    def forward(self, input_ids=None, attention_mask=None, encoder_outputs=None, inputs_embeds=None, **kwargs):
        if attention_mask is None:
            attention_mask = padding_mask(input_ids, self.config.pad_token_id, self.config.eos_token_id)
        if encoder_outputs is None:
            encoder_kwargs = {k: v for k, v in kwargs.items() if k in ("output_attentions", "output_hidden_states")}
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **encoder_kwargs
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=self.encoder.cross_attention_mask(attention_mask),
            encoder_outputs=encoder_outputs,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )


class LSGGenerationMixin:
    """`generate()` without `attention_mask` masks the padding of the input ids.

    `generate` runs the encoder through `get_encoder()` and then calls `forward` with the encoder
    outputs but no input ids, so the mask cannot be built inside the model: it is built here, once,
    and `generate` passes it to the encoder and to every decoding step (cross-attention). The
    caller's tensors are not modified.
    """

    def generate(self, inputs=None, *args, **kwargs):
        if kwargs.get("attention_mask") is None:
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            mask = padding_mask(ids, self.config.pad_token_id, self.config.eos_token_id)
            if mask is not None:
                kwargs["attention_mask"] = mask
        return super().generate(inputs, *args, **kwargs)


def check_length(t: int, limit: int, block_size: int) -> None:
    """One-line error for an input longer than the model's position table."""
    if t > limit:
        longer = -(-t // block_size) * block_size
        raise InputTooLongError(
            f"input has {t} tokens but this model has {limit} positions: truncate to {limit} tokens"
            f" (--max-source-length {limit}) or make a longer model with `longsum convert MODEL --max-length {longer}`"
        )


def key_mask(attention_mask, b: int, t: int, config, device) -> tuple[torch.Tensor, int]:
    """The encoder's key mask over [globals | tokens | block padding] and the padding length.

    A new tensor: the caller's mask is never written (mask_first_token hides token 0 here). Inputs
    longer than two blocks are padded once to whole blocks (lsg_attention would otherwise pad in
    every layer, with the same result); short inputs use full attention and need none.
    """
    G, bs = config.num_global_tokens, config.block_size
    if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
        raise ValueError(f"attention_mask must be [batch, tokens] = [{b}, {t}], got shape {list(attention_mask.shape)}")
    mask = torch.ones(b, t, dtype=torch.bool, device=device) if attention_mask is None else attention_mask
    pad = -t % bs if t > 2 * bs else 0
    mask = F.pad(F.pad(mask.to(device).bool(), (G, 0), value=True), (0, pad), value=False)  # [b, G + t + pad]
    if config.mask_first_token:
        mask[:, G] = False  # token 0 (mask is a new tensor here)
    return mask, pad
