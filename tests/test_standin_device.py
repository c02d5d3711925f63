"""The encoders and shared-K/V beam decoding on a stand-in non-CPU device (`tests/standin_device.py`).

CI has no GPU, yet the code must be right on CUDA: here tiny LSG-BART and LongT5 (local and
transient-global, with longsum's attention) models run on a simulated device whose ops execute on
CPU, and the tests fail on any device mismatch (a CPU tensor meeting a device tensor, e.g. a
`torch.arange` made without `device=`), on any host sync inside the encoders (`.item()`,
`if t.all()`, `torch.equal`, `nonzero`...), and on any output that differs from the same run on CPU.
Decoding syncs by design (beam search's stopping checks), so there only mismatches and ids count.

The stand-in registers a process-global backend that accelerate then reports as the current
accelerator (its `PartialState().device` becomes the stand-in), which would move other tests'
Trainer runs onto it: so every check runs in one subprocess for this whole file (this module run as
a script, `python -m tests.test_standin_device OUT.json`), and the tests read its JSON report.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import T5_DIMS, T5_OWN_TOKENS

ROOT = Path(__file__).resolve().parent.parent
GENERATE = dict(num_beams=4, no_repeat_ngram_size=3, max_new_tokens=8, min_new_tokens=3)
MODELS = ["lsg_bart", "longt5_local", "longt5_tglobal"]
# LSG-BART's other encoder paths (its default, "norm", runs with decoding in MODELS), encoder only.
SPARSITY = ["none", "pooling", "stride", "block_stride", "bos_pooling", "lsh"]


# -- what runs in the subprocess -------------------------------------------------------------------
def _redraw(model):
    """Large random weights: the default init gives nearly the same tokens for every input, and
    then equal ids on both devices would prove little."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.4)
    return model.eval()


def _batch(lengths, vocab: int, pad: int):
    """A right-padded batch of random ids (ids >= 5: no special tokens inside)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, vocab, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


def build(name: str, **lsg):
    """(model with longsum's attention, ids, mask) for one of MODELS, on CPU."""
    torch.manual_seed(0)
    if name == "lsg_bart":
        from longsum.model.lsg import LSGBartForConditionalGeneration
        from longsum.model.tiny import tiny_lsg_bart_config

        settings = {"block_size": 16, "sparse_block_size": 16, **lsg}
        model = LSGBartForConditionalGeneration(tiny_lsg_bart_config(300, 1024, **settings))
        # Long enough for local, sparse and global attention in several blocks; the second row's
        # padding puts masked keys in reach of some blocks, not of others.
        ids, mask = _batch([150, 97], 300, pad=1)
    else:
        from transformers import LongT5Config, LongT5ForConditionalGeneration

        from longsum.model import longt5

        kind = {"longt5_local": "local", "longt5_tglobal": "transient-global"}[name]
        config = LongT5Config(vocab_size=300, **T5_DIMS, dropout_rate=0.0, **T5_OWN_TOKENS, local_radius=3,
                              global_block_size=4, encoder_attention_type=kind)  # fmt: skip
        model = LongT5ForConditionalGeneration(config)
        assert longt5.use_longsum_attention(model) == 2  # one per encoder layer: longsum's, not the stock modules
        ids, mask = _batch([40, 23], 300, pad=0)  # blocks of 4 and global blocks of 4, padding in reach
    return _redraw(model), ids, mask


def run_model(name: str, decode: bool = True, **lsg) -> dict:
    """The encoder (and beam decoding) on CPU and on the stand-in device, and what the stand-in saw."""
    from longsum.model import decoding
    from tests import standin_device as sd

    cpu_model, ids, mask = build(name, **lsg)
    with torch.no_grad():
        torch.manual_seed(1)  # LSG's lsh sparsity draws projections: the same on both devices
        want_hidden = cpu_model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        # exact: torch's own linear kernels on CPU, as off CPU (oneDNN packing is CPU-only)
        want_ids = decoding.generate(cpu_model, ids, mask, exact=True, **GENERATE) if decode else None
    model = copy.deepcopy(cpu_model)
    facts: dict = {"error": None}
    with sd.StandinDevice() as dev, torch.no_grad():
        try:
            sd.to_standin(model)
            dev.watch(model.get_encoder(), "encoder")  # the encoder also runs inside generate: checked there too
            d_ids, d_mask = ids.to(sd.DEVICE), mask.to(sd.DEVICE)
            torch.manual_seed(1)  # (the stand-in draws from the CPU generator)
            hidden = model.get_encoder()(input_ids=d_ids, attention_mask=d_mask).last_hidden_state
            facts["encoder_ops"] = dev.ops
            facts["hidden_device"] = str(hidden.device)
            facts["hidden_max_diff"] = (sd.from_standin(hidden) - want_hidden).abs().max().item()
            if decode:
                facts["sharing"] = decoding.sharing(model)  # None: the shared-K/V path is the one that runs
                got_ids = decoding.generate(model, d_ids, d_mask, **GENERATE)
                facts["ids_device"] = str(got_ids.device)
                facts["ids"], facts["cpu_ids"] = sd.from_standin(got_ids).tolist(), want_ids.tolist()
                facts["stock_fallback"] = decoding._STOCK_ONLY.get(model)  # a swallowed failure of the fast path
        except Exception as err:  # noqa: BLE001  reported, with what the stand-in recorded up to there
            facts["error"] = f"{type(err).__name__}: {err}"
    facts["mismatches"] = sd.summary(dev.mismatches)
    facts["encoder_syncs"] = sd.summary(dev.syncs)  # only the "encoder" scope records syncs here
    return facts


def planted_mismatches() -> dict:
    """Bugs of the kind the stand-in is for: each must be recorded and raised."""
    from longsum.model.lsg import attention
    from tests import standin_device as sd

    facts = {}
    with sd.StandinDevice() as dev, torch.no_grad():
        x = torch.randn(4, 6).to(sd.DEVICE)
        for case, bug in [
            ("cpu_arange_index", lambda: x[:, torch.arange(3)]),  # an index made without device=
            ("cpu_index_select", lambda: x.index_select(1, torch.arange(3))),
            ("cpu_tensor_added", lambda: x + torch.ones(6)),  # e.g. a mask built on CPU
            ("cpu_where", lambda: torch.where(torch.ones(4, 6, dtype=torch.bool), x, torch.zeros(4, 6))),
        ]:
            before = len(dev.mismatches)
            try:
                bug()
                facts[case] = {"raised": False}
            except sd.DeviceMismatch as err:
                facts[case] = {"raised": True, "message": str(err)}
            facts[case]["recorded"] = len(dev.mismatches) - before
    # In a real encoder: LSG's block index built on CPU (the bug `device=` prevents in `block_index`).
    original = attention.block_index
    attention.block_index = lambda t, spec, device="cpu": original(t, spec, "cpu")
    try:
        facts["lsg_block_index_on_cpu"] = run_model("lsg_bart", decode=False)
    finally:
        attention.block_index = original
    return facts


PLANTED_LINE = {}  # which line a planted sync is on, to check that the report points at it


def planted_syncs() -> dict:
    """Host syncs in an encoder scope: each must be recorded at its line, and raised on request."""
    from tests import standin_device as sd

    def item(t):
        return t.sum().item()

    def branch(t):
        return bool((t > 0).any())

    def equal(t):
        return torch.equal(t, t)

    def nonzero(t):
        return (t > 0).nonzero()

    def mask_index(t):
        return t[t > 0]  # a boolean mask: nonzero inside, a sync on CUDA

    def to_host(t):
        return t.tolist()  # a device-to-host copy

    facts = {}
    with torch.no_grad():
        for fn in (item, branch, equal, nonzero, mask_index, to_host):
            PLANTED_LINE[fn.__name__] = f"test_standin_device.py:{fn.__code__.co_firstlineno + 1}"
            with sd.StandinDevice() as dev:
                x = torch.randn(3, 4).to(sd.DEVICE)
                with dev.scope("encoder"):
                    fn(x)
                fn(x)  # outside a scope: allowed (decoding syncs by design), so not recorded
            facts[fn.__name__] = {"syncs": sd.summary(dev.syncs), "line": PLANTED_LINE[fn.__name__]}
            with sd.StandinDevice(raise_on_sync=True) as dev:
                x = torch.randn(3, 4).to(sd.DEVICE)
                try:
                    with dev.scope("encoder"):
                        fn(x)
                    facts[fn.__name__]["raised"] = False
                except sd.HostSync:
                    facts[fn.__name__]["raised"] = True

    # In a real encoder: an `.item()` after the first layer (a forward hook on it, inside the encoder's forward).
    def hook(module, args, output):
        output[0].abs().max().item()

    PLANTED_LINE["encoder_hook"] = f"test_standin_device.py:{hook.__code__.co_firstlineno + 1}"
    model, ids, mask = build("lsg_bart")
    model.get_encoder().layers[0].register_forward_hook(hook)
    with sd.StandinDevice() as dev, torch.no_grad():
        sd.to_standin(model)
        dev.watch(model.get_encoder(), "encoder")
        model.get_encoder()(input_ids=ids.to(sd.DEVICE), attention_mask=mask.to(sd.DEVICE))
    facts["encoder_hook"] = {"syncs": sd.summary(dev.syncs), "line": PLANTED_LINE["encoder_hook"]}
    return facts


def allowed_ops() -> dict:
    """What CUDA runs without an error or a sync must pass: 0-dim CPU tensors (scalars), CPU-only
    ops, explicit copies, a masked fill by indexing (`t[mask] = 0.0`: `masked_fill_`, no `nonzero`)."""
    from tests import standin_device as sd

    with sd.StandinDevice() as dev, torch.no_grad(), dev.scope("encoder"):
        x = torch.randn(4, 6).to(sd.DEVICE)
        y = x * torch.tensor(2.0) + torch.tensor(1.0)  # CPU scalars: passed by value on CUDA
        index = torch.arange(3)[torch.tensor([2, 0])]  # all-CPU work, then an explicit copy
        z = x.index_select(1, index.to(x.device))
        w = torch.zeros(2, 3, device=x.device).copy_(torch.ones(2, 3))  # host-to-device copy: explicit
        v = x.clone()
        v[v > 0] = 0.0
        facts = {"devices": sorted({str(t.device) for t in (y, z, w, v)}), "ops": dev.ops}
    facts["mismatches"], facts["syncs"] = sd.summary(dev.mismatches), sd.summary(dev.syncs)
    x = sd.from_standin(x)
    facts["values_ok"] = bool(
        torch.equal(sd.from_standin(z), x[:, [2, 0]])
        and torch.equal(sd.from_standin(y), x * 2 + 1)
        and torch.equal(sd.from_standin(w), torch.ones(2, 3))
        and torch.equal(sd.from_standin(v), x.clamp(max=0))
    )
    return facts


def swallowed_mismatch() -> dict:
    """A mismatch inside code that catches errors (decoding.generate falls back to stock generate
    when its fast path fails) must still be reported: here the fast n-gram blocker gets a CPU mask."""
    from longsum.model import decoding
    from tests import standin_device as sd

    original = decoding.NoRepeatNGram.__call__

    def buggy(self, input_ids, scores):
        return original(self, input_ids, scores) + torch.zeros(scores.shape)  # made without device=

    decoding.NoRepeatNGram.__call__ = buggy
    try:
        model, ids, mask = build("lsg_bart")
        with sd.StandinDevice() as dev, torch.no_grad():
            sd.to_standin(model)
            # (a few tokens: the fast path fails at the first step, stock generate then runs them all)
            decoding.generate(model, ids.to(sd.DEVICE), mask.to(sd.DEVICE), **{**GENERATE, "max_new_tokens": 4})
        return {"mismatches": sd.summary(dev.mismatches), "stock_fallback": decoding._STOCK_ONLY.get(model)}
    finally:
        decoding.NoRepeatNGram.__call__ = original


def main(out: str) -> None:
    torch.set_num_threads(1)
    report = {}
    scenarios = {name: (lambda name=name: run_model(name)) for name in MODELS}
    for kind in SPARSITY:
        scenarios[f"lsg_{kind}"] = lambda kind=kind: run_model("lsg_bart", decode=False, sparsity_type=kind)
    scenarios.update(planted_mismatches=planted_mismatches, planted_syncs=planted_syncs, allowed_ops=allowed_ops,
                     swallowed_mismatch=swallowed_mismatch)  # fmt: skip
    for name, scenario in scenarios.items():
        try:
            report[name] = scenario()
        except Exception as err:  # noqa: BLE001  one broken scenario fails its tests, not the others'
            report[name] = {"error": f"{type(err).__name__}: {err}"}
    Path(out).write_text(json.dumps(report, indent=1))


# -- the tests (in the pytest process: they read the subprocess's report) ---------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("standin") / "report.json"
    env = {**os.environ, "LONGSUM_STANDIN_PROCESS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.test_standin_device", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text())


def _ok(facts: dict) -> dict:
    assert facts["error"] is None, facts["error"]
    return facts


@pytest.mark.parametrize("name", MODELS)
def test_runs_on_the_standin_device_with_cpu_outputs(report, name):
    facts = _ok(report[name])
    # Evidence that the stand-in really ran the model (not a silent CPU run).
    assert facts["hidden_device"] == facts["ids_device"] == "standin:0"
    assert facts["encoder_ops"] > 100
    # The same CPU kernels on the same numbers (SDPA whole, as one fused call): equal up to the
    # rounding of device-only choices (bigger chunks, masks kept), measured at 0 on today's code.
    assert facts["hidden_max_diff"] <= 1e-6
    assert facts["ids"] == facts["cpu_ids"]
    # The shared-K/V path ran to the end: no precondition failed, no swallowed error made it fall back.
    assert facts["sharing"] is None
    assert facts["stock_fallback"] is None


@pytest.mark.parametrize("name", MODELS)
def test_no_device_mismatch(report, name):
    facts = report[name]
    assert facts.get("mismatches") == {}, facts  # (with the error, if the run stopped)


@pytest.mark.parametrize("name", MODELS)
def test_encoders_do_not_sync(report, name):
    # Sites as "op at file:line (function: code)": count (the encoder runs twice: alone and in generate).
    facts = report[name]
    assert facts.get("encoder_syncs") == {}, facts


@pytest.mark.parametrize("kind", SPARSITY)
def test_lsg_sparsity_encoders_on_the_standin_device(report, kind):
    facts = _ok(report[f"lsg_{kind}"])
    assert facts["hidden_device"] == "standin:0" and facts["hidden_max_diff"] <= 1e-6
    assert facts["mismatches"] == {}
    assert facts["encoder_syncs"] == {}


@pytest.mark.parametrize("case", ["cpu_arange_index", "cpu_index_select", "cpu_tensor_added", "cpu_where"])
def test_planted_cpu_tensor_fails_the_mismatch_check(report, case):
    facts = report["planted_mismatches"][case]
    assert facts["raised"] and facts["recorded"] == 1
    assert "test_standin_device.py" in facts["message"]  # the report points at the planted line


def test_planted_cpu_block_index_fails_in_the_lsg_encoder(report):
    facts = report["planted_mismatches"]["lsg_block_index_on_cpu"]
    assert facts["error"] is not None and facts["error"].startswith("DeviceMismatch")
    assert any("longsum/model/lsg/attention.py" in site for site in facts["mismatches"]), facts["mismatches"]


@pytest.mark.parametrize("kind", ["item", "branch", "equal", "nonzero", "mask_index", "to_host"])
def test_planted_sync_fails_the_sync_check(report, kind):
    facts = report["planted_syncs"][kind]
    # Once: the same call outside the scope is not counted.
    assert len(facts["syncs"]) == 1 and sum(facts["syncs"].values()) == 1, facts["syncs"]
    assert facts["line"] in next(iter(facts["syncs"]))
    assert facts["raised"]


def test_planted_item_in_a_real_encoder_fails_the_sync_check(report):
    facts = report["planted_syncs"]["encoder_hook"]
    # (the encoder's own syncs, if any, are test_encoders_do_not_sync's business)
    planted = [count for site, count in facts["syncs"].items() if facts["line"] in site]
    assert planted == [1], facts["syncs"]


def test_what_cuda_allows_passes(report):
    facts = report["allowed_ops"]
    assert facts["mismatches"] == {} and facts["syncs"] == {}
    assert facts["devices"] == ["standin:0"] and facts["values_ok"]


def test_a_swallowed_mismatch_is_still_reported(report):
    facts = report["swallowed_mismatch"]
    assert facts["stock_fallback"] is not None  # generate caught the error and fell back...
    assert any("test_standin_device.py" in site for site in facts["mismatches"])  # ...the harness still saw it


def test_the_harness_refuses_to_register_in_this_process(monkeypatch):
    from tests import standin_device

    monkeypatch.delenv(standin_device.PROCESS_FLAG, raising=False)
    with pytest.raises(RuntimeError, match="process of its own"):
        standin_device.install()
    assert torch._C._get_privateuse1_backend_name() == "privateuseone"  # nothing registered here


if __name__ == "__main__":
    main(sys.argv[1])
