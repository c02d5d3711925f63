"""LSG-mBART: stock mBART with an LSG encoder (see `common.py` for what changes)."""

from __future__ import annotations

from transformers import MBartConfig
from transformers.models.mbart import modeling_mbart as mbart

from longsum.model.lsg.common import (
    LSGAttentionMixin,
    LSGConfigMixin,
    LSGEncoderMixin,
    LSGGenerationMixin,
    LSGSeq2SeqModelMixin,
    build_once,
)


class LSGMBartConfig(LSGConfigMixin, MBartConfig):
    model_type = "lsg_mbart"


class LSGMBartAttention(LSGAttentionMixin, mbart.MBartAttention):
    pass


class LSGMBartEncoderLayer(mbart.MBartEncoderLayer):
    def __init__(self, config, layer_idx=None):
        super().__init__(config)
        self.self_attn = LSGMBartAttention(
            embed_dim=self.embed_dim,
            num_heads=config.encoder_attention_heads,
            dropout=config.attention_dropout,
            config=config,
        )


class LSGMBartEncoder(LSGEncoderMixin, mbart.MBartEncoder):
    config_class = LSGMBartConfig
    layer_class = LSGMBartEncoderLayer

    def embed(self, input_ids, inputs_embeds):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # scaled inside MBartScaledWordEmbedding
        return inputs_embeds + self.embed_positions(inputs_embeds[..., -1]).to(inputs_embeds.device)


class LSGMBartModel(LSGSeq2SeqModelMixin, mbart.MBartModel):
    config_class = LSGMBartConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.encoder = LSGMBartEncoder(config)
        self.post_init()


class LSGMBartForConditionalGeneration(LSGGenerationMixin, mbart.MBartForConditionalGeneration):
    config_class = LSGMBartConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.model = LSGMBartModel(config)
        self.post_init()


__all__ = ["LSGMBartConfig", "LSGMBartModel", "LSGMBartForConditionalGeneration"]
