"""LSG-BART: stock BART with an LSG encoder (see `common.py` for what changes)."""

from __future__ import annotations

from transformers import BartConfig
from transformers.models.bart import modeling_bart as bart

from longsum.model.lsg.common import (
    LSGAttentionMixin,
    LSGConfigMixin,
    LSGEncoderMixin,
    LSGGenerationMixin,
    LSGSeq2SeqModelMixin,
    build_once,
)


class LSGBartConfig(LSGConfigMixin, BartConfig):
    model_type = "lsg_bart"


class LSGBartAttention(LSGAttentionMixin, bart.BartAttention):
    pass


class LSGBartEncoderLayer(bart.BartEncoderLayer):
    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx)
        self.self_attn = LSGBartAttention(
            embed_dim=self.embed_dim,
            num_heads=config.encoder_attention_heads,
            dropout=config.attention_dropout,
            config=config,
            layer_idx=layer_idx,
        )


class LSGBartEncoder(LSGEncoderMixin, bart.BartEncoder):
    config_class = LSGBartConfig
    layer_class = LSGBartEncoderLayer

    def embed(self, input_ids, inputs_embeds):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # scaled inside BartScaledWordEmbedding
        return inputs_embeds + self.embed_positions(inputs_embeds[:, :, -1]).to(inputs_embeds.device)


class LSGBartModel(LSGSeq2SeqModelMixin, bart.BartModel):
    config_class = LSGBartConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.encoder = LSGBartEncoder(config)
        self.post_init()


class LSGBartForConditionalGeneration(LSGGenerationMixin, bart.BartForConditionalGeneration):
    config_class = LSGBartConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.model = LSGBartModel(config)
        self.post_init()


class LSGBartForSequenceClassification(bart.BartForSequenceClassification):
    config_class = LSGBartConfig

    @build_once
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.model = LSGBartModel(config)
        self.post_init()


__all__ = [
    "LSGBartConfig",
    "LSGBartModel",
    "LSGBartForConditionalGeneration",
    "LSGBartForSequenceClassification",
]
