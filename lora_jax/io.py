"""Files: the names of :mod:`lora_jax.files` under their historical module (kept importable).

Adapters are saved as one self-describing safetensors file (format 2), written atomically;
format-1 saves (``adapters.safetensors`` + ``lora_jax.json``) still load. Every file read is
validated before anything large is allocated; pickles are never opened; problems with a
file's contents raise :class:`AdapterFileError` (a ``ValueError``) naming the file and field.

>>> import tempfile
>>> from lora_jax.io import load, save
>>> from lora_jax.kinds import LoraFactors
>>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=2.0, layout="io")
>>> d = save(tempfile.mkdtemp() + "/run", {"dense/kernel": f})
>>> sorted(os.listdir(d))
['adapters.safetensors']
>>> load(d)["dense/kernel"].scale
2.0
"""

from __future__ import annotations

import os  # noqa: F401 - tests patch io.os; also used by the doctest
from typing import Any

import jax.numpy as jnp  # noqa: F401 - used by the doctests

from lora_jax.files.adapters import flatten_adapters as _flatten
from lora_jax.files.adapters import (
    ADAPTERS_FILE,
    CONFIG_FILE,
    CONFIG_KEY,
    DIGEST_KEY,
    FORMAT,
    FORMAT_VERSION,
    _alpha,
    _as_tree,
    _files,
    _version,
    adapters_to_tree,
    load,
    load_config,
    save,
)
from lora_jax.files.atomic import atomic_write as _atomic_write
from lora_jax.files.atomic import write_json as _write_json
from lora_jax.files.checks import PICKLE_SUFFIXES, AdapterFileError, open_regular, read_json
from lora_jax.files.checks import fail as _fail
from lora_jax.files.checks import refuse_pickle as _refuse_pickle
from lora_jax.files.checks import strict_json as _strict_json
from lora_jax.files.params import PARAMS_FORMAT, _flat_params, _nest, load_params, save_merged, save_params
from lora_jax.files.safetensors import DTYPES as _DTYPES
from lora_jax.files.safetensors import NAMES as _NAMES
from lora_jax.files.safetensors import TensorInfo, read_header, read_safetensors, write_safetensors
from lora_jax.files.safetensors import is_float_dtype as _is_float
from lora_jax.files.safetensors import to_numpy as _to_numpy
from lora_jax.kinds import LoraFactors


def flatten_adapters(adapters: Any) -> dict[str, LoraFactors]:
  """``{path: LoraFactors}`` for a tree of plain-LoRA adapters: this module's historical
  contract, which code that handles only plain LoRA (PEFT export) relies on; another adapter
  kind is a TypeError. :func:`lora_jax.files.flatten_adapters` takes every kind.

  >>> f = LoraFactors(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), scale=1.0, layout="io")
  >>> list(flatten_adapters({"dense": {"kernel": f, "bias": None}}))
  ['dense/kernel']
  """
  return _flatten(adapters, only=LoraFactors)


__all__ = [
    "AdapterFileError",
    "adapters_to_tree",
    "flatten_adapters",
    "load",
    "load_config",
    "load_params",
    "read_header",
    "read_json",
    "read_safetensors",
    "save",
    "save_merged",
    "save_params",
    "TensorInfo",
    "write_safetensors",
]
