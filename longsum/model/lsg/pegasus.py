"""LSG-Pegasus: stock Pegasus with an LSG encoder (see `common.py` for what changes)."""

from __future__ import annotations

from transformers import PegasusConfig
from transformers.models.pegasus import modeling_pegasus as pegasus

from longsum.model.lsg.common import (
    LSGAttentionMixin,
    LSGConfigMixin,
    LSGEncoderMixin,
    LSGGenerationMixin,
    LSGSeq2SeqModelMixin,
    build_once,
)


class LSGPegasusConfig(LSGConfigMixin, PegasusConfig):
    model_type = "lsg_pegasus"


class LSGPegasusAttention(LSGAttentionMixin, pegasus.PegasusAttention):
    pass


class LSGPegasusEncoderLayer(pegasus.PegasusEncoderLayer):
    def __init__(self, config, layer_idx=None):
        super().__init__(config)
        self.self_attn = LSGPegasusAttention(
            embed_dim=self.embed_dim,
            num_heads=config.encoder_attention_heads,
            dropout=config.attention_dropout,
            config=config,
        )


class LSGPegasusEncoder(LSGEncoderMixin, pegasus.PegasusEncoder):
    config_class = LSGPegasusConfig
    layer_class = LSGPegasusEncoderLayer

    def embed(self, input_ids, inputs_embeds):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        return inputs_embeds + self.embed_positions(inputs_embeds.shape[:-1]).to(inputs_embeds.device)


class LSGPegasusModel(LSGSeq2SeqModelMixin, pegasus.PegasusModel):
    config_class = LSGPegasusConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.encoder = LSGPegasusEncoder(config)
        self.post_init()


class LSGPegasusForConditionalGeneration(LSGGenerationMixin, pegasus.PegasusForConditionalGeneration):
    config_class = LSGPegasusConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.model = LSGPegasusModel(config)
        self.post_init()


__all__ = ["LSGPegasusConfig", "LSGPegasusModel", "LSGPegasusForConditionalGeneration"]
