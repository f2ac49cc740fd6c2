"""Mixed-adapter batches against PEFT's ``forward(..., adapter_names=[...])`` on one Llama."""

import copy

import jax
import numpy as np
import pytest

import lora_jax
from _hf import tiny_hf_llama
from _util import assert_close, assert_far, random_adapters
from lora_jax.models import llama

try:
  import peft
  import torch
except ImportError:  # pragma: no cover - the interop extra is not installed
  peft = torch = None

interop = pytest.mark.skipif(torch is None, reason="needs torch, transformers, peft: pip install 'lora_jax[interop]'")
TOKENS = np.array([[1, 5, 9, 33, 2, 77, 100, 3], [4, 4, 8, 15, 16, 23, 42, 127], [7, 0, 1, 2, 3, 4, 5, 6], [9, 9, 9, 1, 2, 3, 4, 5]])
RTOL = 1e-4  # torch vs JAX in float32 through a whole model (see tests/test_interop.py)


@pytest.mark.interop
@interop
@pytest.mark.parametrize("scan", [True, False])
def test_mixed_batch_equals_peft_adapter_names(tmp_path, scan):
  hf_config, torch_model, sd = tiny_hf_llama()
  config = llama.llama_config_from_hf(hf_config, remat=False, scan_layers=scan)
  model = llama.LlamaForCausalLM(config)
  params = llama.load_hf_llama(sd, config)
  lay = llama.lora_layout(config)
  named = {
      "default": random_adapters(params, lora_jax.LoraSpec(".*(q|k|v|o|gate|up|down)_proj/kernel", rank=4, alpha=8.0, layout=lay), seed=0, std=0.3),
      "qv": random_adapters(params, lora_jax.LoraSpec(".*(q|v)_proj/kernel", rank=2, alpha=16.0, layout=lay), seed=1, std=0.3),
  }
  lora_jax.export_peft_set(tmp_path / "set", named, "llama")
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "set").eval()
  pm.load_adapter(tmp_path / "set" / "qv", adapter_name="qv")
  names = ["qv", "__base__", "default", "qv"]
  with torch.no_grad():
    want = pm(torch.tensor(TOKENS), adapter_names=names).logits.numpy()
  bank = lora_jax.stack(named)
  ids = lora_jax.bank_ids(bank, [None if n == "__base__" else n for n in names])
  got = jax.jit(lambda b, ids: lora_jax.wrap(model.apply)(params, b, TOKENS, adapter_ids=ids))(bank, ids)
  assert_close(got, want, RTOL)
  with torch.no_grad():
    base = torch_model(torch.tensor(TOKENS)).logits.numpy()
  for i, n in enumerate(names):
    if n != "__base__":
      assert_far(np.asarray(got)[i], base[i], RTOL)  # each adapter moves its row
