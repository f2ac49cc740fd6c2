"""The tiny random Hugging Face Llama the PyTorch interop tests share (needs torch, transformers)."""


def tiny_hf_llama():
  """``(hf_config, torch_model, state_dict)``: 2 layers, hidden 64, GQA (4 heads, 2 KV heads),
  vocabulary 128, untied head, seeded; the state dict as float32 numpy arrays."""
  import torch
  import transformers

  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=False,
  )
  torch_model = transformers.LlamaForCausalLM(hf_config).eval()
  return hf_config, torch_model, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
