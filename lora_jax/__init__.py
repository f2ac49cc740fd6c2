"""lora_jax: functional LoRA for JAX and Flax."""

from lora_jax.bases.quantized import QuantizedKernel, dequantize, quantize
from lora_jax.adapters import LoraCount, check_adapters, count, init, merge, split, unmerge
from lora_jax.kinds import DoraFactors, LoraFactors
from lora_jax.kinds.bank import LoraBank, bank_ids, bank_names, replace_adapter, stack, unstack
from lora_jax.kinds.convert import to_original_base
from lora_jax.kinds.dora import ShardedNormError
from lora_jax.combination import combine
from lora_jax.interop import NameMap, export_peft, import_peft
from lora_jax.io import AdapterFileError, load, load_config, load_params, save, save_merged, save_params
from lora_jax.files.sets import export_peft_set, import_peft_set, load_set, save_set
from lora_jax.layout import infer_layout
from lora_jax.optim import freeze_base, lora_plus, trainable_mask
from lora_jax.sharding import adapter_shardings, adapter_specs, shard_like
from lora_jax.spec import LoraSpec, Target
from lora_jax.nnx import from_nnx, to_nnx
from lora_jax.transform import (
    THIN_PRODUCT_NAME,
    LoraFallbackError,
    LoraFallbackWarning,
    LoraLayoutWarning,
    Report,
    explain,
    remat_policy,
    wrap,
)

__version__ = "0.3.0"

__all__ = [
    "adapter_shardings",
    "adapter_specs",
    "bank_ids",
    "bank_names",
    "AdapterFileError",
    "check_adapters",
    "combine",
    "count",
    "dequantize",
    "DoraFactors",
    "explain",
    "export_peft",
    "export_peft_set",
    "freeze_base",
    "from_nnx",
    "import_peft",
    "import_peft_set",
    "infer_layout",
    "init",
    "load",
    "load_config",
    "load_params",
    "load_set",
    "lora_plus",
    "LoraBank",
    "LoraCount",
    "LoraFactors",
    "LoraFallbackError",
    "LoraFallbackWarning",
    "LoraLayoutWarning",
    "ShardedNormError",
    "LoraSpec",
    "merge",
    "NameMap",
    "quantize",
    "QuantizedKernel",
    "remat_policy",
    "replace_adapter",
    "Report",
    "save",
    "save_merged",
    "save_params",
    "save_set",
    "shard_like",
    "split",
    "stack",
    "Target",
    "THIN_PRODUCT_NAME",
    "to_nnx",
    "to_original_base",
    "trainable_mask",
    "unmerge",
    "unstack",
    "wrap",
]
