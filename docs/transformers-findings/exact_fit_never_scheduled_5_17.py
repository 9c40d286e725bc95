"""transformers 5.17 CB: a 3-token prompt asks for 2 blocks of 4 tokens; in a 1-block cache it
can never be scheduled, and the generation loop dies, failing every request (public API)."""
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, eos_token_id=0)).eval()
fields = ContinuousBatchingConfig.__dataclass_fields__
page = {"page_size": 4} if "page_size" in fields else {"block_size": 4}
gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=1)
for prompt in ([5, 6], [5, 6, 7]):   # 2 + 1 and 3 + 1 tokens: both fit one block of 4
    cb = ContinuousBatchingConfig(**page, num_blocks=1, max_batch_tokens=8, max_requests_per_batch=2)
    out = model.generate_batch([prompt], generation_config=gen, continuous_batching_config=cb)
    print(len(prompt), "prompt tokens:", {k: (v.generated_tokens, v.error) for k, v in out.items()} or "no result")
