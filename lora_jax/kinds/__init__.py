"""Adapter kinds: plain LoRA, DoRA, and the interface every variant implements (see ``base``)."""

from lora_jax.kinds.base import (
    Adapter,
    check_layout,
    is_adapter,
    is_adapter_or_none,
    kernel_labels,
    kind_named,
    layout_counts,
    leaf_labels,
    register_kind,
    registered_kinds,
)
from lora_jax.kinds.lora import LoraFactors, factor_shapes, kernel_delta, kernel_shape
from lora_jax.kinds.dora import DoraFactors, ShardedNormError

__all__ = [
    "Adapter",
    "check_layout",
    "DoraFactors",
    "ShardedNormError",
    "factor_shapes",
    "is_adapter",
    "is_adapter_or_none",
    "kernel_delta",
    "kernel_labels",
    "kernel_shape",
    "kind_named",
    "layout_counts",
    "leaf_labels",
    "LoraFactors",
    "register_kind",
    "registered_kinds",
]
