"""Files: adapters (one self-describing safetensors file), params and merged exports, and a
safetensors reader that trusts nothing it reads.

* :mod:`~lora_jax.files.checks`: :class:`AdapterFileError`, regular-file opening, strict and
  bounded JSON;
* :mod:`~lora_jax.files.atomic`: all-or-nothing writes (temp file, fsync, one rename);
* :mod:`~lora_jax.files.safetensors`: the validating reader and the writer;
* :mod:`~lora_jax.files.adapters`: :func:`save` / :func:`load` / :func:`load_config`;
* :mod:`~lora_jax.files.params`: :func:`save_params` / :func:`load_params` / :func:`save_merged`.
"""

from lora_jax.files.adapters import adapters_to_tree, flatten_adapters, load, load_config, save
from lora_jax.files.checks import AdapterFileError, read_json
from lora_jax.files.params import load_params, save_merged, save_params
from lora_jax.files.safetensors import TensorInfo, read_header, read_safetensors, write_safetensors

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
