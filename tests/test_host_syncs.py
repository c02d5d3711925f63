"""The encoders' attention never makes the host wait for an accelerator (no data-dependent host reads).

A host sync is an op whose result the host needs before it can queue more work: reading a tensor's
value (`.item()`, `bool(t)`, `if t.all():` -> `aten._local_scalar_dense` / `aten.is_nonzero`),
comparing whole tensors (`torch.equal`), or an op whose output size depends on the data (`nonzero`,
`masked_select`, boolean indexing, `unique`...). On CUDA each one drains the queue (what
`torch.cuda.set_sync_debug_mode` flags). No GPU here: the ops are counted on CPU by a dispatch mode.
LSG attention has one path on every device (only its chunk size depends on the device); LongT5's
skips building masks for interior blocks on CPU, where reading data on the host is free, so it is
counted with the choices made as on an accelerator (`accelerator_policy`). The encoders also run on the
meta device (no data at all: a host read raises there), which takes the non-CPU path unpatched.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longsum.model import longt5
from longsum.model.lsg import LSGBartForConditionalGeneration, attention
from longsum.model.lsg.attention import LSGSpec, lsg_attention
from longsum.model.tiny import tiny_lsg_bart_config
from tests.test_longt5 import batch, build, pair

# aten ops that make the host wait for the device (their overload packet names).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive", "repeat_interleave", "bincount", "histc",
})  # fmt: skip
ACCELERATOR = torch.device("cuda")  # only a name here: the policy functions look at `device.type`
CPU_GATHER_BUDGET = attention.gather_budget


class HostSyncs(TorchDispatchMode):
    """Counts the host-sync ops dispatched inside the `with` block, by op name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def accelerator_policy(monkeypatch):
    """Chunk sizes and mask choices made as on an accelerator, for CPU tensors."""
    for module, name in [(attention, "gather_budget"), (longt5, "_chunk_bytes"), (longt5, "skips_interior_masks")]:
        policy = getattr(module, name)
        monkeypatch.setattr(module, name, lambda device, *rest, policy=policy: policy(ACCELERATOR, *rest))


def padded_qkv(b=2, h=4, n=300, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 170:] = False  # the second row is padded: blocks with and without padding in reach
    return q, k, v, mask


def tiny_lsg_bart():
    torch.manual_seed(0)
    return LSGBartForConditionalGeneration(tiny_lsg_bart_config(300, 1024, block_size=16, sparse_block_size=16)).eval()


def test_the_policies_differ_by_device():
    cpu = torch.device("cpu")
    assert longt5.skips_interior_masks(cpu) and not longt5.skips_interior_masks(ACCELERATOR)
    assert attention.gather_budget(ACCELERATOR, 4) > attention.gather_budget(cpu, 4)
    assert attention.gather_budget(ACCELERATOR, 2) == 2 * attention.gather_budget(ACCELERATOR, 4)  # bytes, not elements
    assert longt5._chunk_bytes(ACCELERATOR) > longt5._chunk_bytes(cpu)


def test_the_counter_sees_a_host_read():  # the dispatch mode does see the ops it counts
    x = torch.ones(3, dtype=torch.bool)
    with HostSyncs() as syncs:
        bool(x.all()), torch.equal(x, x), x.nonzero()
    assert syncs.ops == {"_local_scalar_dense": 1, "equal": 1, "nonzero": 1}


@pytest.mark.parametrize("sparsity_type", ["norm", "pooling", "lsh", "stride", "block_stride", "bos_pooling", "none"])
@pytest.mark.parametrize("chunking", ["cpu", "accelerator", "block-per-chunk"])
def test_lsg_attention_without_host_syncs(request, monkeypatch, sparsity_type, chunking):
    if chunking == "accelerator":
        request.getfixturevalue("accelerator_policy")
    if chunking == "block-per-chunk":  # many chunks, interior ones among them (all keys visible)
        monkeypatch.setattr(attention, "gather_budget", lambda device, itemsize: 1)
    spec = LSGSpec(block_size=16, sparse_block_size=16, sparsity_factor=2, sparsity_type=sparsity_type)
    q, k, v, mask = padded_qkv()
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as cpu:  # the numbers of the CPU chunking, as tests/lsg check them
        cpu.setattr(attention, "gather_budget", CPU_GATHER_BUDGET)
        want = lsg_attention(q, k, v, mask, spec)  # (also fills block_index's cache: built once per length)
    torch.manual_seed(0)  # (lsh draws its projections)
    with HostSyncs() as syncs:
        got = lsg_attention(q, k, v, mask, spec)
    assert dict(syncs.ops) == {}
    torch.testing.assert_close(got, want)


def test_lsg_bart_encoder_without_host_syncs(accelerator_policy):
    model = tiny_lsg_bart()
    ids = torch.randint(5, 300, (2, 200), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 120:] = 0
    with torch.no_grad():
        model.get_encoder()(input_ids=ids, attention_mask=mask)  # block_index's cache
        with HostSyncs() as syncs:
            model.get_encoder()(input_ids=ids, attention_mask=mask)
    assert dict(syncs.ops) == {}


@pytest.mark.parametrize("kind", ["local", "transient-global"])
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["accelerator", "block-per-chunk"])
def test_longt5_encoder_without_host_syncs(accelerator_policy, monkeypatch, kind, chunk_bytes):
    if chunk_bytes is not None:  # many chunks, interior ones among them (the CPU skip would compare them)
        monkeypatch.setattr(longt5, "_chunk_bytes", lambda device: chunk_bytes)
    stock, ours = pair(kind)
    ids, mask = batch((40, 23))  # blocks of 4: interior blocks and padding in reach
    with torch.no_grad():
        want = stock.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        with HostSyncs() as syncs:
            got = ours.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert dict(syncs.ops) == {}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the full-mask path gives the stock numbers


class DeviceReads(HostSyncs):
    """Also counts copies from CPU tensors onto the device (on CUDA, pageable host-to-device copies sync too)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        sources = {x.device.type for x in args if isinstance(x, torch.Tensor)}
        if func.overloadpacket.__name__ in ("_to_copy", "copy_") and "cpu" in sources and out.device.type != "cpu":
            self.ops["host-to-device"] += 1
        return out


def test_lsg_bart_encoder_runs_on_meta():
    # On the meta device (no data: any host read raises) the encoders take their non-CPU path as chosen
    # from the device itself, with nothing patched.
    with torch.device("meta"):
        model = tiny_lsg_bart()
    ids, mask = torch.zeros(2, 200, dtype=torch.long, device="meta"), torch.ones(2, 200, device="meta")
    model.get_encoder()(input_ids=ids, attention_mask=mask)  # block_index's cache (built on CPU once per length)
    with DeviceReads() as reads:
        out = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.device.type == "meta" and dict(reads.ops) == {}


@pytest.mark.parametrize("kind, stock_copies", [("local", 1), ("transient-global", 0)])
def test_longt5_encoder_runs_on_meta(kind, stock_copies):
    with torch.device("meta"):
        model = build(kind, redraw=False)
    assert longt5.use_longsum_attention(model) == 2
    ids, mask = (x.to("meta") for x in batch((40, 23)))
    with DeviceReads() as reads:
        out = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    # The local stack's own `_get_local_attention_mask` (once per forward, before any attention) builds a small
    # index tensor on CPU and copies it over; longsum's code adds none.
    assert out.device.type == "meta" and reads.ops["host-to-device"] == stock_copies
    assert sum(reads.ops.values()) == stock_copies
