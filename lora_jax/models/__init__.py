"""Reference models for examples, benchmarks and PEFT interop (import the submodules directly).

>>> from lora_jax.models import llama
>>> llama.LlamaConfig.tiny().num_hidden_layers
2
"""
