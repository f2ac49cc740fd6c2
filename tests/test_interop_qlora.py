"""QLoRA across the two worlds: lora_jax's NF4 base against transformers + bitsandbytes'
``load_in_4bit`` model (CPU backend), with adapters going both ways through PEFT."""

import copy
import os

import jax
import numpy as np
import pytest

import lora_jax
from _hf import tiny_hf_llama
from _util import assert_close, assert_far, random_adapters
from lora_jax.interop import export_peft, import_peft
from lora_jax.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.interop
TOKENS = np.array([[1, 5, 9, 33, 2, 77, 100, 3], [4, 4, 8, 15, 16, 23, 42, 127]])
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Same NF4 weights on both sides (bit for bit without double quantization), float32 compute:
# the logits agree as the dense float32 interop tests' do (1e-4 of the largest logit).
RTOL = 1e-4
# ... except that bitsandbytes' CPU 4-bit matmul computes in bfloat16 on CPUs with AVX512-BF16
# (its fused CPU kernel, for weights it repacks at load: the input is cast to bf16), so there
# the torch side is bf16-precise (measured: 3.6e-3 of the largest logit for the base, 1.4e-2 with
# adapters, through two layers) and is compared to 3e-2 there; the codes stay bit-exact.
import bitsandbytes.functional as _bnbf  # noqa: E402

BNB_RTOL = 3e-2 if _bnbf.has_avx512bf16() else RTOL


def _bnb_model(directory, double_quant):
  cfg = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
      bnb_4bit_compute_dtype=torch.float32,
  )
  return transformers.LlamaForCausalLM.from_pretrained(
      directory, quantization_config=cfg, dtype=torch.float32, device_map="cpu"
  ).eval()


def _logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  hf_config, torch_model, sd = tiny_hf_llama()
  directory = tmp_path_factory.mktemp("tiny_llama")
  torch_model.save_pretrained(directory)
  config = llama.llama_config_from_hf(hf_config, remat=False, scan_layers=True)
  model = llama.LlamaForCausalLM(config)
  params = llama.load_hf_llama(sd, config)
  return directory, config, model, params


def _quantized(params, config, model, double_quant):
  return lora_jax.quantize(
      params, MODULES, model.apply, TOKENS, format="nf4", double_quant=double_quant
  )


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_base_equals_bitsandbytes_load_in_4bit(setup, double_quant):
  directory, config, model, params = setup
  bnb_model = _bnb_model(directory, double_quant)
  q = _quantized(params, config, model, double_quant)
  kernel = q["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(kernel, lora_jax.QuantizedKernel) and kernel.shape[0] == config.num_hidden_layers
  # The packed codes are bitsandbytes' own, layer by layer (torch (out, in) -> our (in, out)).
  for layer in range(config.num_hidden_layers):
    w = bnb_model.model.layers[layer].self_attn.q_proj.weight
    out_f, in_f = w.quant_state.shape
    theirs = w.data.numpy().reshape(out_f, in_f // 2).T
    np.testing.assert_array_equal(np.asarray(kernel.codes[layer]), theirs)
  apply = jax.jit(lora_jax.wrap(model.apply))
  ours = np.asarray(apply(q, None, TOKENS))
  # Double quantization: bitsandbytes' CPU kernel rounds a few block scales lying within
  # ~1e-6 of a code midpoint the other way (ours is exact nearest, as its CUDA kernel), which
  # moves those blocks by one step of the 8-bit scale code: 2e-3 of the largest logit covers it.
  assert_close(ours, _logits(bnb_model), max(BNB_RTOL, RTOL if not double_quant else 2e-3))


def test_adapters_trained_on_an_nf4_base_load_into_peft_qlora(tmp_path, setup):
  directory, config, model, params = setup
  q = _quantized(params, config, model, False)
  spec = lora_jax.LoraSpec(MODULES, rank=4, alpha=8, layout=llama.lora_layout(config))
  adapters = random_adapters(q, spec, seed=0, std=0.3)
  apply = jax.jit(lora_jax.wrap(model.apply))
  want = np.asarray(apply(q, adapters, TOKENS))
  bnb_model = _bnb_model(directory, False)
  assert_far(want, _logits(bnb_model), RTOL)
  export_peft(tmp_path, adapters, "llama", base_model_name_or_path=os.fspath(directory))
  peft_model = peft.PeftModel.from_pretrained(bnb_model, tmp_path).eval()
  if BNB_RTOL == RTOL:  # a float32 reference; on bf16-compute CPUs a few logits differ by 3e-2
    assert_close(_logits(peft_model), want, RTOL)
  # And back: the same adapters, so the same logits on the quantized base.
  back = import_peft(tmp_path, q, "llama")
  assert_close(apply(q, back, TOKENS), want, RTOL)


def test_peft_qlora_adapters_run_on_an_nf4_base(tmp_path, setup):
  directory, config, model, params = setup
  torch.manual_seed(3)
  bnb_model = _bnb_model(directory, False)
  cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=MODULES, init_lora_weights=False, task_type="CAUSAL_LM")
  peft_model = peft.get_peft_model(copy.deepcopy(bnb_model), cfg).eval()
  peft_model.save_pretrained(tmp_path)
  want = _logits(peft_model)
  assert_far(want, _logits(bnb_model), RTOL)
  q = _quantized(params, config, model, False)
  adapters = import_peft(tmp_path, q, "llama")
  assert_close(jax.jit(lora_jax.wrap(model.apply))(q, adapters, TOKENS), want, BNB_RTOL)
