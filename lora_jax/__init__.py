"""lora_jax: functional LoRA for JAX and Flax."""

from lora_jax.adapters import LoraCount, check_adapters, count, init, merge, split, unmerge
from lora_jax.adapters_node import LoraFactors
from lora_jax.spec import LoraSpec, Target
from lora_jax.transform import wrap

__version__ = "0.1.0"

__all__ = [
    "LoraCount",
    "LoraFactors",
    "LoraSpec",
    "Target",
    "check_adapters",
    "count",
    "init",
    "merge",
    "split",
    "unmerge",
    "wrap",
]
