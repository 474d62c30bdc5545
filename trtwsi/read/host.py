"""Host memory slots that slide chunks are decoded into and async host → device copies read.

:class:`HostSlot` is the interface (a 1-D uint8 ``tensor``, numpy views, a ``ready`` event);
:class:`PinnedBuffer` is page-locked memory from torch's pinned allocator (reader threads);
:class:`SharedBuffer` is one slot of a shared ``/dev/shm`` mapping that reader processes write
(page-locked by the owner with ``cudaHostRegister``).
"""

from __future__ import annotations

import numpy as np

from trtwsi.errors import RegionError

__all__ = ["HostSlot", "PinnedBuffer", "SharedBuffer"]


class HostSlot:
    """A slot of host memory that async copies read: a 1-D uint8 ``tensor``, numpy views of its
    leading bytes (:meth:`view`), and ``ready``, the event after which it may be overwritten
    (the last async copy that reads it), or None. A writer calls :meth:`wait_ready` first: a
    wait on one event, not on the device."""

    def __init__(self, array: np.ndarray, tensor):
        self._array = array
        self.tensor = tensor
        self.ready = None

    @property
    def nbytes(self) -> int:
        return self._array.nbytes

    def view(self, shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
        """C-contiguous numpy view of the leading bytes, ``shape`` of ``dtype``."""
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n > self.nbytes:
            raise RegionError(f"host buffer of {self.nbytes} bytes cannot hold {shape} {dtype}")
        return self._array[:n].view(dtype).reshape(shape)

    def wait_ready(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None


class PinnedBuffer(HostSlot):
    """A page-locked host buffer of ``nbytes`` bytes (torch's pinned allocator), reusable for
    regions of any shape: readers decode straight into it
    (``slide.read_region(..., out=buf.view((h, w, 3)))``)."""

    def __init__(self, nbytes: int):
        import torch

        tensor = torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=True)
        super().__init__(tensor.numpy(), tensor)


class SharedBuffer(HostSlot):
    """One slot of the shared ring: bytes ``[offset, offset + nbytes)`` of the mapping, with the
    :class:`trtwsi.runtime.gpu.device.HostSlot` interface (``tensor``, :meth:`view`, ``ready``)."""

    def __init__(self, array: np.ndarray, offset: int, nbytes: int):
        part = array[offset : offset + nbytes]
        try:
            import torch

            tensor = torch.from_numpy(part)
        except ImportError:  # pragma: no cover - readers work without torch
            tensor = None
        super().__init__(part, tensor)
        self.offset = offset
