"""lora_jax: functional LoRA for JAX and Flax."""

from lora_jax.bases.quantized import QuantizedKernel, dequantize, quantize
from lora_jax.adapters import LoraCount, check_adapters, count, init, merge, split, unmerge
from lora_jax.kinds import DoraFactors, LoraFactors
from lora_jax.kinds.convert import to_original_base
from lora_jax.combine import combine
from lora_jax.interop import NameMap, export_peft, import_peft
from lora_jax.io import AdapterFileError, load, load_config, load_params, save, save_merged, save_params
from lora_jax.layout import infer_layout
from lora_jax.optim import freeze_base, lora_plus, trainable_mask
from lora_jax.sharding import adapter_shardings, shard_like
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
    "AdapterFileError",
    "check_adapters",
    "combine",
    "count",
    "dequantize",
    "DoraFactors",
    "explain",
    "export_peft",
    "freeze_base",
    "from_nnx",
    "import_peft",
    "infer_layout",
    "init",
    "load",
    "load_config",
    "load_params",
    "lora_plus",
    "LoraCount",
    "LoraFactors",
    "LoraFallbackError",
    "LoraFallbackWarning",
    "LoraLayoutWarning",
    "LoraSpec",
    "merge",
    "NameMap",
    "quantize",
    "QuantizedKernel",
    "remat_policy",
    "Report",
    "save",
    "save_merged",
    "save_params",
    "shard_like",
    "split",
    "Target",
    "THIN_PRODUCT_NAME",
    "to_nnx",
    "to_original_base",
    "trainable_mask",
    "unmerge",
    "wrap",
]
