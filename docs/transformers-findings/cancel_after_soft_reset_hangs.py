"""transformers CB: cancelling the last running request after a soft-reset offload strands the
offloaded request forever (public API only)."""
import time
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, eos_token_id=0)).eval()
fields = ContinuousBatchingConfig.__dataclass_fields__
page = {"page_size": 4} if "page_size" in fields else {"block_size": 4}
cb = ContinuousBatchingConfig(**page, num_blocks=32, max_batch_tokens=64, max_requests_per_batch=4)
manager = model.init_continuous_batching(GenerationConfig(do_sample=False, eos_token_id=-1), cb)
manager.start()
# 32 blocks of 4 tokens: each request fits alone (121 and 108 tokens), not both. b comes second,
# so once they meet b is starved and offloaded (soft reset, requeued) and new requests are held
# back until a request finishes; a is cancelled instead of finishing
manager.add_request(list(range(1, 12)), request_id="a", max_new_tokens=110, streaming=True)
seen = {}
while True:
    out = manager.get_result(timeout=5)
    assert out is not None, "no result in 5 s"
    seen[out.request_id] = len(out.generated_tokens)
    if out.request_id == "a" and "b" not in seen:
        manager.add_request(list(range(20, 28)), request_id="b", max_new_tokens=100, streaming=True)
        seen["b"] = 0
    if out.request_id == "a" and len(out.generated_tokens) >= 80:
        manager.cancel_request("a")   # b was offloaded at about 55 tokens each
        break
print("tokens before the cancel:", seen)
result = None
deadline = time.time() + 10
while time.time() < deadline:
    out = manager.get_result(timeout=1)
    if out is not None and out.request_id == "b" and out.is_finished():
        result = out
        break
print("b finished:" if result else "b never finished (10 s), though the cache is empty now:",
      result.generated_tokens if result else "")
try:  # diagnosis only (internal state)
    sched = manager.batch_processor.scheduler
    print("waiting:", list(sched.waiting_requests), "active:", list(sched.active_requests),
          "block_new_requests:", sched.block_new_requests)
except AttributeError:
    pass
manager.stop(block=True, timeout=2)
