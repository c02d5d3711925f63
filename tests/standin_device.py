"""A stand-in non-CPU device for CI machines without a GPU: finds device mismatches and host syncs.

Code meant for CUDA can be wrong in ways CPU runs never show: a tensor made without `device=` (a
CPU `torch.arange` indexing or added to a GPU tensor: an error on CUDA, or a hidden host-to-device
copy), or a host sync (`.item()`, `if tensor.all()`, `torch.equal`, `nonzero`) that stalls the GPU
pipeline every layer. This module gives tensors a device of their own, `standin`, whose arithmetic
runs on CPU, and checks every op on the way:

* `install()` registers PyTorch's PrivateUse1 slot as a Python backend named `standin`
  (`torch.utils.backend_registration._setup_privateuseone_for_python_backend`), so that
  `torch.device("standin")`, `tensor.to("standin")` and `module.to("standin")` parse and pass
  torch's lazy device initialisation.
* A `standin` tensor is a wrapper (`_make_wrapper_subclass`: shape, strides and dtype, no storage)
  around the CPU tensor that holds its values (`StandinTensor.inner`).
* `StandinDevice` is a dispatch mode (`TorchDispatchMode`): inside `with StandinDevice() as dev:`
  every aten op reaches it first, including factories (`torch.arange(n, device=x.device)`). An op
  that touches a `standin` tensor or is asked for `device="standin"` runs on the inner CPU tensors
  and its outputs are wrapped again; a pure CPU op runs as it is.

What it checks:

* **Device mismatch**: an op (other than an explicit copy: `.to()`, `copy_`) that mixes a `standin`
  tensor with a CPU tensor of one element or more. A 0-dim CPU tensor is allowed, as CUDA allows
  it (a wrapped scalar, passed by value). Stricter than CUDA in one place on purpose: CUDA accepts
  CPU index tensors (`gpu[cpu_index]`, `index_select`) by copying them to the device behind the
  caller's back (a host-to-device copy, and for bool masks a sync); here that is a mismatch too.
  Each mismatch is recorded in `dev.mismatches` and raised (`DeviceMismatch`): recorded because
  code under test may catch the error and take a fallback path (longsum's `decoding.generate`
  retries with stock generate), which must not hide it.
* **Host syncs** inside a scope (`dev.scope("encoder")`, or `dev.watch(module, "encoder")` for a
  module's forward): ops whose result the host has to wait for, applied to a `standin` tensor
  (`_local_scalar_dense`: `.item()`, `bool()`, `int()`; `equal`; `nonzero`, `masked_select`,
  `unique`, `t[bool_mask]`...: data-dependent shapes; `.to("cpu")`/`.tolist()`: device-to-host copies). They are
  recorded in `dev.syncs` with the code location (first frame outside torch and this module), and
  raised only when `StandinDevice(raise_on_sync=True)`. Outside a scope syncs are allowed (beam
  search stops on a host-side check by design).

Limits:

* Ops run by CPU kernels, so numbers equal CPU runs; CUDA-only kernels (flash attention) and CUDA
  rounding are not exercised, nor are code paths chosen by `device.type == "cuda"` (the stand-in's
  type is `standin`, so such branches take their non-CUDA side, as on any other accelerator).
* Autograd is not supported (run under `torch.no_grad()`; parameters are frozen by `to_standin`).
* An in-place op that changes a tensor's shape or strides (`resize_`, `out=` into a wrong-sized
  tensor, `set_`, `as_strided_`) cannot update the wrapper and raises `NotImplementedError`.
* Storage-level access (`untyped_storage()`, `data_ptr()`) does not work on a wrapper; `.tolist()` and
  `.numpy()` do (as a device-to-host copy).
* The registration is process-global and cannot be undone; it also makes `torch.accelerator` and
  accelerate report `standin` as the current accelerator (accelerate's `PartialState().device`
  becomes `standin`), which would move other tests' Trainer runs onto it. So `install()` refuses to
  run unless `LONGSUM_STANDIN_PROCESS=1` is set: tests use it from a subprocess of their own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

NAME = "standin"
DEVICE: torch.device | None = None  # set by install(): torch parses the name only once it is registered
PROCESS_FLAG = "LONGSUM_STANDIN_PROCESS"

aten = torch.ops.aten

# Ops that make the host wait for the device's result (the device-to-host copies are checked apart).
SYNC_OPS = {
    # .item(), bool(t), int(t), float(t), `if t.any():` (`item` and `is_nonzero` are composites of this one)
    aten._local_scalar_dense.default,
    aten.equal.default,  # torch.equal: a bool on the host
    aten.nonzero.default,  # data-dependent output shapes
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.allclose.default,
}
# Indexing ops whose boolean-mask indices hide a `nonzero` (see `_mask_index`).
INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
# Explicit copies between devices: the only ops allowed to mix CPU and stand-in tensors.
TRANSFER_OPS = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}

_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


class DeviceMismatch(RuntimeError):
    """An op mixed a stand-in tensor with a CPU tensor (on CUDA: an error or a hidden copy)."""


class HostSync(RuntimeError):
    """A host sync inside a checked scope (raised only with `raise_on_sync=True`)."""


def install() -> torch.device:
    """Register the `standin` backend: once per process, later calls return the same device (idempotent)."""
    global DEVICE
    if os.environ.get(PROCESS_FLAG) != "1":
        raise RuntimeError(
            f"the stand-in device registers a process-global backend that accelerate then picks as the current"
            f" accelerator; run it in a process of its own with {PROCESS_FLAG}=1"
        )
    current = torch._C._get_privateuse1_backend_name()
    if current == NAME and hasattr(torch, NAME):
        DEVICE = torch.device(NAME, 0)
        return DEVICE
    if current != "privateuseone":
        raise RuntimeError(f"PrivateUse1 is already taken by backend {current!r} in this process")
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(NAME)
    DEVICE = torch.device(NAME, 0)
    _register_kernels()
    return DEVICE


_LIBRARY = None


def _register_kernels() -> None:
    """Backend kernels for the few ops that torch runs with dispatch modes switched off: `torch.tensor(data,
    device=...)` builds on CPU and copies to the device with the Python key excluded, so those
    reach the PrivateUse1 backend itself (allocation and the copy, both legitimate: explicit)."""
    global _LIBRARY
    lib = torch.library.Library("aten", "IMPL")  # kept alive: dropping it unregisters the kernels

    def empty_strided(size, stride, *, dtype=None, layout=None, device=None, pin_memory=None):
        return StandinTensor(torch.empty_strided(size, stride, dtype=dtype))

    def empty(size, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
        return StandinTensor(torch.empty(size, dtype=dtype, memory_format=memory_format))

    def copy_from(source, destination, non_blocking=False):
        values = source.inner if isinstance(source, StandinTensor) else source
        if isinstance(destination, StandinTensor):
            destination.inner.copy_(values)
        else:
            destination.copy_(values)
        return destination

    lib.impl("empty_strided", empty_strided, "PrivateUse1")
    lib.impl("empty.memory_format", empty, "PrivateUse1")
    lib.impl("_copy_from", copy_from, "PrivateUse1")
    _LIBRARY = lib


class StandinTensor(torch.Tensor):
    """A tensor on the stand-in device: metadata only, its values in `inner` (a CPU tensor)."""

    inner: torch.Tensor
    __slots__ = ("inner",)

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        if DEVICE is None:
            raise RuntimeError("call standin_device.install() first")
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.size(),
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=DEVICE,
            requires_grad=False,
        )
        wrapper.inner = inner
        return wrapper

    def __repr__(self, *, tensor_contents=None):
        return f"StandinTensor({self.inner!r})"

    # torch refuses these for subclasses; on a device they are a device-to-host copy, checked as one.
    def tolist(self):
        return self.cpu().tolist()

    def numpy(self, *, force: bool = False):
        return self.cpu().numpy()

    # Subclass-aware torch functions would re-wrap the CPU results of `.cpu()` as this class.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Only reached when no StandinDevice mode is active: the mode handles every op before this.
        raise RuntimeError(f"{func} on a stand-in tensor outside `with StandinDevice():`")


def _location() -> str:
    """file:line of the innermost frame outside torch and this module (where the op was asked for)."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _HERE and not path.startswith(_TORCH_DIR):
            return f"{_short(path)}:{frame.lineno} ({frame.name}: {(frame.line or '').strip()})"
    return "?"


def _short(path: str) -> str:
    for marker in ("/longsum/", "/transformers/", "/tests/"):
        if marker in path:
            return path[path.rindex(marker) + 1 :]
    return path


@dataclass
class Event:
    op: str
    scope: str | None
    where: str


class StandinDevice(TorchDispatchMode):
    """The dispatch mode that runs stand-in ops on CPU and checks them (see the module docstring)."""

    def __init__(self, raise_on_sync: bool = False):
        super().__init__()
        install()
        self.raise_on_sync = raise_on_sync
        self.mismatches: list[Event] = []
        self.syncs: list[Event] = []
        self.ops = 0  # ops that ran on the stand-in device (evidence that it was really used)
        self._scopes: list[str] = []

    @contextlib.contextmanager
    def scope(self, name: str):
        """Syncs on the stand-in device inside this block are recorded (and raised with raise_on_sync)."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def watch(self, module: torch.nn.Module, name: str):
        """Check `module`'s forward as scope `name` (returns the hook handles)."""
        handles = []

        def enter(*_):
            self._scopes.append(name)

        def leave(*_):
            self._scopes.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
        return handles

    def __enter__(self):
        # The function mode first, so that it is still there while this one runs (modes nest).
        self._fused = _FusedKernels(self)
        self._fused.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._fused.__exit__(*sys.exc_info())
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._fused.__exit__(*exc)

    def check_mixing(self, name: str, leaves: list) -> None:
        """Record and raise a DeviceMismatch when CPU tensors (of one element or more) meet stand-in ones."""
        cpu = [t for t in leaves if isinstance(t, torch.Tensor) and not isinstance(t, StandinTensor) and t.dim()]
        if cpu:
            event = Event(name, self._scope(), _location())
            self.mismatches.append(event)
            shapes = ", ".join(str(tuple(t.shape)) for t in cpu)
            raise DeviceMismatch(f"{name}: CPU tensor(s) {shapes} meet a {NAME} tensor at {event.where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        on_device = [t for t in leaves if isinstance(t, StandinTensor)]
        to_device = _is_standin(kwargs.get("device"))
        if not on_device and not to_device:
            return func(*args, **kwargs)  # a CPU op: nothing to check
        self.ops += 1
        name = str(func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else func)
        if func not in TRANSFER_OPS:
            self.check_mixing(name, leaves)
        if self._scope() is not None and (func in SYNC_OPS or _to_host(func, args, kwargs) or _mask_index(func, args)):
            event = Event(name, self._scope(), _location())
            self.syncs.append(event)
            if self.raise_on_sync:
                raise HostSync(f"{name}: host sync in {event.scope} at {event.where}")
        return self._run(func, args, kwargs)

    def _scope(self) -> str | None:
        return self._scopes[-1] if self._scopes else None

    def _run(self, func, args, kwargs):
        inners = {}  # id(inner CPU tensor) -> its wrapper: in-place ops and `out=` return the wrapper

        def unwrap(x):
            if isinstance(x, StandinTensor):
                inners[id(x.inner)] = x
                return x.inner
            if _is_standin(x):
                return torch.device("cpu")
            return x

        cpu_args, cpu_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if func is aten._to_copy.default:
            source = args[0]
            target = kwargs.get("device", source.device)
            out = func(*cpu_args, **cpu_kwargs)
            return StandinTensor(out) if _is_standin(target) else out
        if func is aten.copy_.default:  # dst.copy_(src): dst keeps its device, src may be either
            func(*cpu_args, **cpu_kwargs)
            return args[0]
        out = func(*cpu_args, **cpu_kwargs)

        def wrap(x):
            if not isinstance(x, torch.Tensor):
                return x
            same = inners.get(id(x))
            if same is not None:
                if same.shape != x.shape or same.stride() != x.stride():
                    raise NotImplementedError(f"{func}: the stand-in device cannot change a tensor's shape in place")
                return same
            return StandinTensor(x)

        return tree_map(wrap, out)


class _FusedKernels(TorchFunctionMode):
    """Runs `F.scaled_dot_product_attention` of stand-in tensors as one call of the CPU kernel.

    SDPA is a composite op that picks its fused kernel by device type from a table only C++ can
    extend; for any other backend it decomposes into the math path (bmm, softmax, bmm), which rounds
    differently from CPU's (and CUDA's) fused kernels. Taking the call whole keeps the stand-in's
    numbers equal to CPU's and, like a GPU, runs attention as one fused kernel.
    """

    def __init__(self, owner: StandinDevice):
        super().__init__()
        self.owner = owner  # where the op is counted and a mismatch recorded

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            leaves, _ = tree_flatten((args, kwargs))
            if any(isinstance(t, StandinTensor) for t in leaves):
                self.owner.ops += 1
                self.owner.check_mixing("scaled_dot_product_attention", leaves)
                inner = tree_map(lambda t: t.inner if isinstance(t, StandinTensor) else t, (args, kwargs))
                return StandinTensor(func(*inner[0], **inner[1]))  # CPU tensors only: the dispatch mode lets them by
        return func(*args, **kwargs)


def _is_standin(device) -> bool:
    if isinstance(device, str):
        return device.split(":")[0] == NAME
    return isinstance(device, torch.device) and device.type == NAME


def _to_host(func, args, kwargs) -> bool:
    """A device-to-host copy: `.to("cpu")`/`.cpu()`/`.tolist()` of a stand-in tensor, or `cpu.copy_(standin)`."""
    if func is aten._to_copy.default:
        return (
            isinstance(args[0], StandinTensor)
            and kwargs.get("device") is not None
            and not _is_standin(kwargs["device"])
        )
    if func is aten.copy_.default:
        return not isinstance(args[0], StandinTensor) and isinstance(args[1], StandinTensor)
    return False


def _mask_index(func, args) -> bool:
    """Indexing by a boolean mask (`t[mask]`, `t[mask] = values`): the kernel turns the mask into
    indices with `nonzero`, whose output size the host must read. Not `t[mask] = scalar` with one
    mask: torch runs that as `masked_fill_`, no sync."""
    if func not in INDEX_OPS:
        return False
    masks = [i for i in args[1] if i is not None and i.dtype in (torch.bool, torch.uint8)]
    if not masks:
        return False
    return func is aten.index.Tensor or not (len(args[1]) == 1 and args[2].numel() == 1)


def to_standin(module: torch.nn.Module) -> torch.nn.Module:
    """Move `module` to the stand-in device (call inside `with StandinDevice():`); parameters are
    frozen, since the stand-in does not support autograd."""
    module.requires_grad_(False)
    return module.to(DEVICE)


def from_standin(x):
    """The CPU values of a stand-in tensor (or of each tensor in a nested structure), without the
    checks: for comparing results after the run."""
    return tree_map(lambda t: t.inner.clone() if isinstance(t, StandinTensor) else t, x)


def summary(events: list[Event]) -> dict[str, int]:
    """{"op at file:line (...)": count}: the distinct sites, for reports and assertion messages."""
    counts: dict[str, int] = {}
    for e in events:
        key = f"{e.op} at {e.where}"
        counts[key] = counts.get(key, 0) + 1
    return counts
