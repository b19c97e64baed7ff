"""A stand-in accelerator for CPU-only test machines: tensors that report the ``meta`` device but
carry real CPU data, so code under test runs to the end, and any op that mixes them with host
tensors raises :class:`DeviceMixup` (as CUDA raises "Expected all tensors to be on the same device").

Inside ``with VirtualDevice():``

- ``t.to("meta")`` / ``torch.zeros(..., device="meta")`` give data-carrying virtual-device tensors;
- ops on virtual-device tensors give virtual-device tensors; ``.cpu()`` / ``.to("cpu")`` give host tensors;
- ``int(t)``, ``t.item()``, ``bool(t)`` work (a host sync, allowed on CUDA too);
- ``t.numpy()`` on a virtual-device tensor raises (as on a CUDA tensor);
- mixing a virtual-device tensor with a host tensor of one or more dimensions raises, except host
  index tensors in indexing (CUDA accepts those) and 0-dim host tensors (CUDA accepts those too);
- ``torch.autocast("meta", ...)`` is a no-op (there is no autocast for the meta device).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")
_aten = torch.ops.aten
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default}


class DeviceMixup(RuntimeError):
    """An op got tensors on the (virtual) device and on the host."""


class _OnDevice(torch.Tensor):
    """A virtual-device tensor: reports ``meta``, keeps its values in ``payload`` (a CPU tensor)."""

    @staticmethod
    def __new__(cls, payload: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, payload.shape, strides=payload.stride(), dtype=payload.dtype,
                                                device=DEVICE, requires_grad=payload.requires_grad,
                                                storage_offset=payload.storage_offset())
        t.payload = payload
        return t

    def __repr__(self) -> str:
        return f"OnVirtualDevice({self.payload!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("virtual-device tensors are only usable inside `with VirtualDevice():`")


def on_device(t) -> bool:
    """Whether ``t`` is a virtual-device tensor."""
    return isinstance(t, _OnDevice)


def host(t: torch.Tensor) -> torch.Tensor:
    """The CPU values of a virtual-device tensor (usable outside the mode)."""
    return t.payload if isinstance(t, _OnDevice) else t


class VirtualDevice(TorchDispatchMode):
    """Run torch code with the virtual device (see the module doc)."""

    def __enter__(self):
        self._autocast = torch.autocast
        torch.autocast = _autocast_skipping_meta(self._autocast)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.autocast = self._autocast
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flags = {"device": False, "host": False}

        def unwrap(x, record=True):
            if isinstance(x, _OnDevice):
                flags["device"] = True
                return x.payload
            if isinstance(x, torch.Tensor):
                if x.device.type == "meta":
                    raise DeviceMixup(f"{func}: a data-less meta tensor reached the code")
                if record and x.dim() > 0:
                    flags["host"] = True
            return x

        if func in _INDEX_OPS:  # host index tensors are accepted by CUDA
            args = (unwrap(args[0]), tree_map(lambda x: unwrap(x, record=False), args[1]),
                    *tree_map(unwrap, tuple(args[2:])))
        else:
            args = tree_map(unwrap, args)
        kwargs = tree_map(unwrap, kwargs)
        target = kwargs.get("device")
        to_device = target is not None and torch.device(target).type == "meta"
        if to_device:
            kwargs["device"] = torch.device("cpu")
        if func is _aten._to_copy.default and target is not None and not to_device:
            return func(*args, **kwargs)  # to the host
        if flags["device"] and flags["host"]:
            raise DeviceMixup(f"{func}: tensors on the device and on the host")
        out = func(*args, **kwargs)
        if func is _aten._local_scalar_dense.default or not (flags["device"] or to_device):
            return out
        return tree_map(lambda t: _OnDevice(t) if type(t) is torch.Tensor else t, out)


def _autocast_skipping_meta(autocast):
    def patched(device_type, *args, **kwargs):
        if device_type == "meta":
            return contextlib.nullcontext()
        return autocast(device_type, *args, **kwargs)
    return patched
