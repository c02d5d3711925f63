"""LSG-RoBERTa and LSG-XLM-RoBERTa: the LSG-BERT pieces (`bert.py`) on the RoBERTa stock classes.

Same behaviour as the original `modeling_lsg_roberta.py` / `modeling_lsg_xlm_roberta.py`: the
stock RoBERTa positions (counted from `padding_idx + 1` over non-pad tokens, pads at `padding_idx`)
are computed on the `t` tokens only; the globals are prepended after, with no position. The
global embeddings are `roberta.embeddings.global_embeddings.weight` in the task models.
"""

from __future__ import annotations

from transformers import RobertaConfig, XLMRobertaConfig
from transformers.models.roberta import modeling_roberta as roberta
from transformers.models.xlm_roberta import modeling_xlm_roberta as xlmr

from longsum.model.lsg.bert import LSGEmbeddingsMixin, LSGEncoderModelMixin, LSGSelfAttentionMixin
from longsum.model.lsg.common import LSGConfigMixin, build_once


class _RobertaPositionsMixin:
    def max_tokens(self) -> int:
        # RoBERTa positions start at padding_idx + 1 (a 4096-token model has 4098 rows).
        return self.config.max_position_embeddings - (self.config.pad_token_id or 0) - 1


# ---------------------------------------------------------------------------------------------
# RoBERTa
# ---------------------------------------------------------------------------------------------
class LSGRobertaConfig(LSGConfigMixin, RobertaConfig):
    model_type = "lsg_roberta"


class LSGRobertaEmbeddings(LSGEmbeddingsMixin, roberta.RobertaEmbeddings):
    pass


class LSGRobertaSelfAttention(LSGSelfAttentionMixin, roberta.RobertaSelfAttention):
    pass


class LSGRobertaModel(_RobertaPositionsMixin, LSGEncoderModelMixin, roberta.RobertaModel):
    config_class = LSGRobertaConfig
    embeddings_class = LSGRobertaEmbeddings
    self_attention_class = LSGRobertaSelfAttention


class LSGRobertaForMaskedLM(roberta.RobertaForMaskedLM):
    config_class = LSGRobertaConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.roberta = LSGRobertaModel(config, add_pooling_layer=False)
        self.post_init()


class LSGRobertaForSequenceClassification(roberta.RobertaForSequenceClassification):
    config_class = LSGRobertaConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.roberta = LSGRobertaModel(config, add_pooling_layer=False)
        self.post_init()


# ---------------------------------------------------------------------------------------------
# XLM-RoBERTa
# ---------------------------------------------------------------------------------------------
class LSGXLMRobertaConfig(LSGConfigMixin, XLMRobertaConfig):
    model_type = "lsg_xlm-roberta"


class LSGXLMRobertaEmbeddings(LSGEmbeddingsMixin, xlmr.XLMRobertaEmbeddings):
    pass


class LSGXLMRobertaSelfAttention(LSGSelfAttentionMixin, xlmr.XLMRobertaSelfAttention):
    pass


class LSGXLMRobertaModel(_RobertaPositionsMixin, LSGEncoderModelMixin, xlmr.XLMRobertaModel):
    config_class = LSGXLMRobertaConfig
    embeddings_class = LSGXLMRobertaEmbeddings
    self_attention_class = LSGXLMRobertaSelfAttention


class LSGXLMRobertaForMaskedLM(xlmr.XLMRobertaForMaskedLM):
    config_class = LSGXLMRobertaConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.roberta = LSGXLMRobertaModel(config, add_pooling_layer=False)
        self.post_init()


class LSGXLMRobertaForSequenceClassification(xlmr.XLMRobertaForSequenceClassification):
    config_class = LSGXLMRobertaConfig

    @build_once
    def __init__(self, config):
        super().__init__(config)
        self.roberta = LSGXLMRobertaModel(config, add_pooling_layer=False)
        self.post_init()


__all__ = [
    "LSGRobertaConfig",
    "LSGRobertaModel",
    "LSGRobertaForMaskedLM",
    "LSGRobertaForSequenceClassification",
    "LSGXLMRobertaConfig",
    "LSGXLMRobertaModel",
    "LSGXLMRobertaForMaskedLM",
    "LSGXLMRobertaForSequenceClassification",
]
