"""Communicators of synchronized layers: an mpi4py intracommunicator (``MPI.COMM_WORLD`` by
default) or any object with an int ``size`` and an ``allgather(send, receive)`` method, adapted
to the core's reduction hook ``_core.Communicator``. A single process needs no hook at all, so
``synchronized=True`` then runs exactly the unsynchronized kernels."""

from __future__ import annotations

import numbers
import sys
import warnings
from typing import Any

from . import _core

_PROTOCOL = (
    "an mpi4py intracommunicator, or an object with an int `size` and a method "
    "`allgather(send, receive)` that gathers the float64 vector `send` of every process into "
    "`receive` (size * len(send) values, in rank order)"
)


def _from_mpi4py(mpi: Any, comm: Any) -> _core.Communicator | None:
    if mpi.Is_finalized():
        raise ValueError("communicator: MPI is already finalized")
    if comm == mpi.COMM_NULL:
        raise ValueError("communicator: MPI.COMM_NULL cannot synchronize statistics")
    if comm.Is_inter():
        raise ValueError(
            "communicator: an MPI intercommunicator cannot synchronize statistics; pass an "
            "intracommunicator (e.g. intercomm.Merge())"
        )
    size = comm.Get_size()
    if size == 1:
        return None
    double = mpi.DOUBLE

    def allgather(send: Any, receive: Any) -> None:
        comm.Allgather([send, double], [receive, double])

    return _core.Communicator(size, allgather)


def _from_protocol(obj: Any) -> _core.Communicator | None:
    size = getattr(obj, "size", None)
    allgather = getattr(obj, "allgather", None)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not callable(allgather):
        raise TypeError(f"communicator must be {_PROTOCOL}; got {obj!r}")
    if size < 1:
        raise ValueError(f"communicator: size must be >= 1, got {size}")
    return None if size == 1 else _core.Communicator(int(size), allgather)


def hook_for(communicator: Any) -> _core.Communicator | None:
    """The core hook for an explicit communicator (None for a single process); raises
    TypeError/ValueError naming the problem when it cannot synchronize."""
    # An mpi4py communicator exists only once mpi4py.MPI is imported, so look it up there
    # instead of importing (and initializing) MPI for objects of other kinds.
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(communicator, mpi.Comm):
        return _from_mpi4py(mpi, communicator)
    return _from_protocol(communicator)


def default_hook() -> _core.Communicator | None:
    """The hook for ``MPI.COMM_WORLD``, or None when mpi4py is missing or there is one process."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    except RuntimeError as error:  # mpi4py is installed but finds no usable MPI library
        warnings.warn(
            f"synchronized=True: mpi4py cannot initialize MPI ({error}); the layer uses its own "
            "batch statistics",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return _from_mpi4py(MPI, MPI.COMM_WORLD)
