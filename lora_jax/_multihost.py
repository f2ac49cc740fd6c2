"""Multi-process (multi-host) pieces: placing host values on a global mesh, bringing arrays
that span other processes' devices to the host, and writing a file once for all processes.

Under ``jax.distributed.initialize()`` every process runs the same program over one global
mesh; an array sharded over it is not *fully addressable* (each process holds only its own
shards), so ``np.asarray`` of it fails and a save from every process would write one file N
times at once. Here, with ``jax.process_count() > 1``:

* :func:`to_host` gathers such an array to a numpy array on every process (a collective:
  every process must call it, for the same arrays, in the same order);
* :func:`once` runs a write on process 0 only and makes every process wait for it (a
  collective again), re-raising a failure of process 0 on the others;
* :func:`place` puts a host value (or a process-local array) on a global sharding.

With one process each is what a single-process program does already (no collective, no copy).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def multiprocess() -> bool:
  """Whether this program runs as several JAX processes (``jax.distributed.initialize``)."""
  return jax.process_count() > 1


def _spans_processes(x: Any) -> bool:
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_fully_addressable


def to_host(x: Any) -> Any:
  """``x`` as a numpy array if it is a ``jax.Array`` spanning other processes' devices, else ``x``.

  A fully replicated array is read from this process's own shard (no communication); any
  other is gathered with ``multihost_utils.process_allgather``, which every process must call
  for the same array (so call this from every process, in the same order).
  """
  if not _spans_processes(x):
    return x
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree: Any) -> Any:
  """:func:`to_host` of every array leaf of ``tree`` (adapters, a quantized base leaf, ...)."""
  if not multiprocess():
    return tree
  return jax.tree.map(to_host, tree)


def once(what: str, write: Callable[[], T]) -> T | None:
  """Runs ``write()`` on process 0 only and makes every process wait until it is done.

  The wait is ``multihost_utils.broadcast_one_to_all`` of process 0's outcome, so when it
  returns on any process the file is in place (a load from any process, on a shared file
  system, sees it); if ``write`` raised on process 0, it raises there and every other process
  raises ``OSError`` naming ``what`` (none is left waiting). With one process: ``write()``.
  """
  if not multiprocess():
    return write()
  from jax.experimental import multihost_utils

  result: T | None = None
  error: BaseException | None = None
  if jax.process_index() == 0:
    try:
      result = write()
    except Exception as e:  # told to the other processes below, then re-raised
      error = e
  failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
  if error is not None:
    raise error
  if failed:
    raise OSError(
        f"{what}: process 0, which writes for all {jax.process_count()} processes, failed; its "
        "traceback gives the cause. Nothing was written."
    )
  return result


def place(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """``x`` placed with ``sharding``, also when ``sharding`` spans several processes' devices.

  ``jax.device_put`` refuses to put an array committed to one of this process's devices on a
  sharding over other processes' devices; a host value (numpy, or a fully addressable array,
  read back to the host) is then placed with ``jax.make_array_from_callback``, each process
  filling its own shards. Every process must pass the same value. Arrays already spread over
  processes, tracers, and shardings of this process's devices go to ``jax.device_put``.

  >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec
  >>> s = NamedSharding(Mesh(jax.devices()[:1], ("tp",)), PartitionSpec(None, "tp"))
  >>> place(np.ones((2, 4), np.float32), s).sharding == s
  True
  """
  if sharding.is_fully_addressable or isinstance(x, jax.core.Tracer) or _spans_processes(x):
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


__all__ = ["multiprocess", "once", "place", "to_host", "tree_to_host"]
