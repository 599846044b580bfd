"""Out-of-bounds checks for Triton kernels run in the interpreter (TRITON_INTERPRET=1).

The interpreter reads and writes raw addresses, so a kernel that touches memory outside its tensors
silently reads garbage or corrupts a neighbour on CPU, where the GPU stops with "an illegal memory
access". ``bounds_checked()`` makes every load, store and atomic whose mask is on raise instead unless
its address lies inside one tensor argument of the running kernel (the argument's view: from its
first element to one past its last). Use: ``with bounds_checked() as hits: run(...)``; ``hits`` lists
the violations (the first one also raises, naming the kernel, its program and the nearest tensor).
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np


def _extent(t) -> tuple[int, int]:
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


@contextlib.contextmanager
def bounds_checked():
    import triton.runtime.interpreter as interp

    current = {"kernel": None, "ranges": []}
    hits: list[str] = []
    executor, builder = interp.GridExecutor, interp.InterpreterBuilder
    saved = (executor._init_args_hst, builder.create_masked_load, builder.create_masked_store,
             builder.create_atomic_rmw)

    def init_args(self, args_dev, kwargs):
        args, kw = saved[0](self, args_dev, kwargs)
        names = inspect.getfullargspec(self.fn).args
        current["kernel"] = getattr(self.fn, "__name__", str(self.fn))
        current["ranges"] = [(name, *_extent(t)) for name, t in list(zip(names, args)) + list(kw.items())
                             if hasattr(t, "data_ptr") and hasattr(t, "stride")]
        return args, kw

    def check(kind, ptrs, mask, nbytes):
        p = np.asarray(ptrs).astype(np.uint64)
        if mask is not None:
            p = p[np.broadcast_to(np.asarray(mask).astype(bool), p.shape)]
        if p.size == 0:
            return
        inside = np.zeros(p.shape, dtype=bool)
        for _, lo, hi in current["ranges"]:
            inside |= (p >= lo) & (p + nbytes <= hi)
        if inside.all():
            return
        bad = int(p[~inside][0])
        name, lo, _ = min(current["ranges"], key=lambda r: min(abs(bad - r[1]), abs(bad - r[2])))
        msg = (f"{kind} outside every tensor in {current['kernel']} program {interp.interpreter_builder.grid_idx}: "
               f"{int((~inside).sum())} addresses, the first {bad - lo:+d} bytes from {name}'s start")
        hits.append(msg)
        raise IndexError(msg)

    def load(self, ptrs, mask, other, *rest):
        check("load", ptrs.data, mask.data, np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return saved[1](self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        check("store", ptrs.data, mask.data, value.data.dtype.itemsize)
        return saved[2](self, ptrs, value, mask, *rest)

    def atomic(self, op, ptr, val, mask, *rest):
        check("atomic", ptr.data, mask.data, val.data.dtype.itemsize)
        return saved[3](self, op, ptr, val, mask, *rest)

    executor._init_args_hst = init_args
    builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw = load, store, atomic
    try:
        yield hits
    finally:
        (executor._init_args_hst, builder.create_masked_load, builder.create_masked_store,
         builder.create_atomic_rmw) = saved
