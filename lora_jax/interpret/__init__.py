"""The jaxpr interpreter behind :func:`lora_jax.wrap`: core (evaluation, higher-order
primitives), views (structural ops on adapted kernels), sites (matmul / conv / lookup
consumers, where adapter kinds contribute) and report (what was factored)."""
