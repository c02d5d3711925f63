"""LSG-BERT: stock BERT whose encoder runs LSG attention over global tokens + the input.

What changes from the stock model, and how the original LSG code (ccdv-ai, `modeling_lsg_bert.py`)
does it, so that converted checkpoints (ccdv/lsg-bert-*) give the same numbers:

* Embeddings: the stock `LayerNorm(word + token_type + position)` of the `t` tokens, with `G` global
  embeddings **prepended**; the globals get no position and no token type, only the same
  LayerNorm and dropout. The parameter is `embeddings.global_embeddings.weight` (`[512, hidden]`,
  first `G` rows used), i.e. `bert.embeddings.global_embeddings.weight` in the task models.
* Self-attention: the shared LSG attention forward (`common.LSGSelfAttention`) on the stock
  `query` / `key` / `value` projections (names unchanged, so stock weights load); the mask it gets
  is the 2-D boolean key mask over `G + t`. The stock `BertSelfOutput` applies the output projection.
* Model forward: the input is padded to whole blocks when `t > 2 * block_size`; `mask_first_token`
  hides token 0 as a key. The output drops the globals and the padding (`last_hidden_state` is
  `[b, t, hidden]`); with `pool_with_global` token 0's output is first replaced by global 0's, so
  the pooler and the classification heads (which read position 0) read global 0.

The shared pieces are the mixins below; `roberta.py` combines them with the RoBERTa and XLM-RoBERTa
stock classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
from transformers.models.bert import modeling_bert as bert
from transformers.utils.output_capturing import capture_outputs

from longsum.errors import LSGConfigError
from longsum.model.lsg.common import (
    MAX_GLOBAL_TOKENS,
    LSGConfigMixin,
    LSGSelfAttention,
    build_once,
    check_length,
    key_mask,
    warn_no_attention_weights,
)


class LSGEmbeddingsMixin:
    """The stock token embeddings with the `G` global embeddings prepended.

    The original concatenates `[globals | word + type + position]` and then applies the embedding
    LayerNorm and dropout. Both act on each position alone, so running the stock forward on the
    tokens and normalising the globals separately gives the same numbers while reusing the stock
    position logic (RoBERTa's padding-aware positions included).
    """

    def __init__(self, config):
        super().__init__(config)
        self.num_global_tokens = config.num_global_tokens
        self.global_embeddings = nn.Embedding(MAX_GLOBAL_TOKENS, config.hidden_size)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
        tokens = super().forward(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )  # [b, t, d], normalised and dropped out
        b, G = tokens.shape[0], self.num_global_tokens
        glob = self.LayerNorm(self.global_embeddings.weight[:G]).to(tokens.dtype)  # [G, d]
        glob = self.dropout(glob.expand(b, G, -1))  # dropout per row, as on the concatenation
        return torch.cat([glob, tokens], dim=1)  # [b, G + t, d]


class LSGSelfAttentionMixin(LSGSelfAttention):
    """LSG self-attention on the BERT-like stock self-attention (BERT, RoBERTa, XLM-RoBERTa)."""

    def project(self, hidden_states):
        return self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)

    def output(self, context):
        return context  # the stock BertSelfOutput (dense + dropout + LayerNorm) runs after this module

    def attention_dropout(self) -> float:
        return self.dropout.p  # an nn.Dropout in the stock BERT-like attention


class LSGEncoderModelMixin:
    """Global tokens, whole blocks and output trimming around the stock encoder layers.

    Subclasses set `embeddings_class` and `self_attention_class`; the stock `__init__` builds
    everything else (pooler included) under the stock parameter names.
    """

    embeddings_class: type[nn.Module]
    self_attention_class: type[nn.Module]

    @build_once
    def __init__(self, config, add_pooling_layer=True):
        if config.is_decoder or config.add_cross_attention:
            raise LSGConfigError(
                "LSG encoders are bidirectional: set is_decoder=False and add_cross_attention=False in the config"
            )
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        self.embeddings = self.embeddings_class(config)
        for i, layer in enumerate(self.encoder.layer):
            layer.attention.self = self.self_attention_class(config, layer_idx=i)
        self.post_init()

    def max_tokens(self) -> int:
        """The longest input the position table covers."""
        return self.config.max_position_embeddings

    # Hidden states stay as the layers produce them (globals first, block padding kept), as in the
    # original; only `last_hidden_state` is trimmed, so it is not tied into `hidden_states`.
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if encoder_hidden_states is not None or past_key_values is not None:
            raise ValueError("LSG encoders have no cross-attention and no cache")
        config = self.config
        warn_no_attention_weights(config, kwargs)
        G, bs = config.num_global_tokens, config.block_size
        b, t = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        check_length(t, self.max_tokens(), bs)

        hidden = self.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )  # [b, G + t, d]
        mask, pad = key_mask(attention_mask, b, t, config, hidden.device)  # [b, G + t + pad]
        hidden = F.pad(hidden, (0, 0, 0, pad))

        hidden = self.encoder(hidden, attention_mask=mask, **kwargs).last_hidden_state
        if config.pool_with_global:  # token 0 <- global 0, then drop the globals
            hidden = torch.cat([hidden[:, :1], hidden[:, G + 1 : G + t]], dim=1)
        else:
            hidden = hidden[:, G : G + t]  # [b, t, d]
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden, pooler_output=pooled)


# ---------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------
class LSGBertConfig(LSGConfigMixin, BertConfig):
    model_type = "lsg_bert"


class LSGBertEmbeddings(LSGEmbeddingsMixin, bert.BertEmbeddings):
    pass


class LSGBertSelfAttention(LSGSelfAttentionMixin, bert.BertSelfAttention):
    pass


class LSGBertModel(LSGEncoderModelMixin, bert.BertModel):
    config_class = LSGBertConfig
    embeddings_class = LSGBertEmbeddings
    self_attention_class = LSGBertSelfAttention


class LSGBertForMaskedLM(bert.BertForMaskedLM):
    config_class = LSGBertConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.bert = LSGBertModel(config, add_pooling_layer=False)
        self.post_init()


class LSGBertForSequenceClassification(bert.BertForSequenceClassification):
    config_class = LSGBertConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.bert = LSGBertModel(config)
        self.post_init()


__all__ = [
    "LSGBertConfig",
    "LSGBertModel",
    "LSGBertForMaskedLM",
    "LSGBertForSequenceClassification",
]
