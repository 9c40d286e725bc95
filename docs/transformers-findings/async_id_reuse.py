"""transformers CB, async batching (CUDA): a request whose id was used by a request that finished
just before gets a wrong first token (public API only)."""
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, eos_token_id=0,
    attn_implementation="paged|eager")).to("cuda", torch.float64).eval()


def run(use_async: bool, ids: list[str]) -> list[list[int]]:
    """Each prompt after the previous one finished, under the given request ids."""
    cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=64, max_requests_per_batch=4,
                                  use_async_batching=use_async)
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, eos_token_id=-1), cb)
    manager.start()
    outs = []
    for rid, prompt in zip(ids, ([5, 6, 7], [9, 10, 11, 12], [100, 101])):
        manager.add_request(prompt, request_id=rid, max_new_tokens=5)
        result = manager.get_result(request_id=rid, timeout=30)
        while result is None or not result.is_finished():
            result = manager.get_result(request_id=rid, timeout=30)
        outs.append(result.generated_tokens)
    manager.stop(block=True)
    return outs


reference = run(False, ["x", "x", "x"])
print("sync,  id x reused:    ", reference)
print("async, fresh ids:      ", run(True, ["x", "y", "z"]))
print("async, id x reused:    ", run(True, ["x", "x", "x"]))
