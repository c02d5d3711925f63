"""Shared fixtures: a byte-level BPE tokenizer trained here and tiny models built in code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses too: tiny models only lose from thread handoffs
# CPU kernels from the CPU's features, not a timing run (deterministic, no second of calibration per process);
# a cache folder of the session's own, never the user's (tests/test_cpu_kernels.py measures in tmp_path).
os.environ.setdefault("LONGSUM_CALIBRATE", "0")
os.environ.setdefault("LONGSUM_CACHE", tempfile.mkdtemp(prefix="longsum-test-cache-"))
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
LSG_REF = FIXTURES / "lsg_ref"

CORPUS = [
    "Long documents such as scientific papers, reports and book chapters need long-context models.",
    "The encoder reads thousands of tokens; local, sparse and global attention keep the cost linear.",
    "Summaries are short. They keep the main findings, the methods and the conclusions of a study.",
    "Rivers, towns, bridges and markets grew over two hundred years along the valley floor.",
    "Solar microgrids bring electricity to rural districts at a lower cost than grid extension.",
] * 4


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from longsum.model.tiny import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_lsg_bart(tokenizer):
    """Factory: an untrained tiny LSG-BART (seeded) with LSG overrides."""
    from longsum.model.lsg import LSGBartForConditionalGeneration
    from longsum.model.tiny import tiny_lsg_bart_config

    def make(seed: int = 0, **lsg):
        torch.manual_seed(seed)
        return LSGBartForConditionalGeneration(tiny_lsg_bart_config(len(tokenizer), 1024, **lsg)).eval()

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny LSG-BART with only 256 positions (chunking is easy to trigger), 8-token summaries."""
    from longsum.model.tiny import build_tiny_lsg_bart

    folder = tmp_path_factory.mktemp("tiny-model")
    texts = CORPUS + [" ".join("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split())] * 4
    model, _ = build_tiny_lsg_bart(texts, folder, max_positions=256, block_size=16, sparse_block_size=16)
    model.generation_config.max_new_tokens = 8
    model.generation_config.save_pretrained(folder)
    return folder


def input_dependent(model, std: float = 0.4):
    """Re-draw a tiny model's weight matrices and embeddings so its outputs depend on its input (the
    default init gives nearly the same tokens for every document). Returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing by the name this transformers has: 5.23 renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable` (the old name warns)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def random_ids(batch: int, length: int, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    """`<s> ... </s>` sequences of random ids above the special tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return ids
