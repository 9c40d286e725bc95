"""transformers CB, async batching (CUDA): cancelling a request while it is in the batch in flight
can crash the generation loop (KeyError in the prefix-cache bookkeeping), failing every request
(public API only)."""
import logging
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, eos_token_id=0,
    attn_implementation="paged|eager")).to("cuda").eval()
fields = ContinuousBatchingConfig.__dataclass_fields__
page = {"page_size": 4} if "page_size" in fields else {"block_size": 4}
cb = ContinuousBatchingConfig(**page, num_blocks=256, max_batch_tokens=64,
                              max_requests_per_batch=8, use_async_batching=True)
manager = model.init_continuous_batching(GenerationConfig(do_sample=False, eos_token_id=-1), cb)
manager.start()
# eight requests; each is cancelled as soon as it has streamed k tokens (k = 3..10)
for i in range(8):
    manager.add_request([1 + i, 2, 3, 4, 5], request_id=f"r{i}", max_new_tokens=200, streaming=True)
manager.add_request([7, 7, 7], request_id="bystander", max_new_tokens=150, streaming=True)
cancelled, errors, finished = set(), {}, {}
while manager.is_running() and len(finished) + len(errors) < 1:
    out = manager.get_result(timeout=5)
    if out is None:
        break
    if out.error is not None:
        errors[out.request_id] = out.error
    elif out.request_id == "bystander" and out.is_finished():
        finished["bystander"] = len(out.generated_tokens)
    elif out.request_id.startswith("r") and out.request_id not in cancelled \
            and len(out.generated_tokens) >= 3 + int(out.request_id[1:]):
        manager.cancel_request(out.request_id)
        cancelled.add(out.request_id)
while (out := manager.get_result(timeout=1)) is not None:
    if out.error is not None:
        errors[out.request_id] = out.error
print("loop still running:", manager.is_running())
print("bystander finished with", finished.get("bystander"), "tokens" if finished else "")
print("requests failed with an error:", {k: v[:80] for k, v in errors.items()})
manager.stop(block=True, timeout=5)
