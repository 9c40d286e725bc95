"""transformers CB: cancel_request(x) followed by add_request(..., request_id=x) before the
generation loop's next iteration (public API only, any mode, CPU or CUDA).

Both calls only enqueue; the loop applies a batch of queued additions first, then the queued
cancellations, by request id. So the cancel also removes the *new* request named x:
  (a) x still waiting: the id is queued twice for scheduling but stored once; the cancel removes
      one, the scheduler looks up the other and raises KeyError, which kills the generation thread
      and fails every request (here, the bystander y);
  (b) x running: the new x is removed with the old one and never gets a result.
"""
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig


def make_manager():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=0)).eval()
    fields = ContinuousBatchingConfig.__dataclass_fields__
    page = {"page_size": 4} if "page_size" in fields else {"block_size": 4}
    cb = ContinuousBatchingConfig(**page, num_blocks=64, max_batch_tokens=64,
                                  max_requests_per_batch=4)
    return model.init_continuous_batching(GenerationConfig(do_sample=False, eos_token_id=-1), cb)


def results(manager, wanted, seconds=5.0):
    """The final result of each id in ``wanted`` that arrives within ``seconds``."""
    import time
    got, deadline = {}, time.time() + seconds
    while set(got) != wanted and time.time() < deadline:
        out = manager.get_result(timeout=0.2)
        if out is not None and out.is_finished():
            got[out.request_id] = out
    return got


# (a) x cancelled while waiting and re-added: queued before the loop starts, so deterministic
manager = make_manager()
manager.add_request([1, 2, 3], request_id="x", max_new_tokens=4)
manager.cancel_request("x")
manager.add_request([4, 5, 6], request_id="x", max_new_tokens=4)
manager.add_request([7, 8, 9], request_id="y", max_new_tokens=4)
manager.start()
got = results(manager, {"x", "y"})
print("(a) results:", {k: (v.generated_tokens, v.error) for k, v in got.items()},
      "| generation thread failed:", manager.background_thread_status.fatal_error is not None
      if hasattr(manager, "background_thread_status") else "?")
manager.stop(block=True, timeout=2)

# (b) x cancelled while running and re-added at once, 20 times; control: re-added as a new id
for same_id in (True, False):
    lost = 0
    manager = make_manager()
    manager.start()
    for trial in range(20):
        first, second = f"x{trial}", f"x{trial}" if same_id else f"z{trial}"
        manager.add_request(list(range(1, 9)), request_id=first, max_new_tokens=200,
                            streaming=True)
        out = manager.get_result(timeout=5)          # running: its first token came back
        assert out is not None and out.request_id == first
        manager.cancel_request(first)
        manager.add_request([4, 5, 6], request_id=second, max_new_tokens=3)
        lost += second not in results(manager, {second}, seconds=2)
    print(f"(b) cancel, then add {'the same id' if same_id else 'a new id'}: the new request "
          f"got no result in {lost} of 20 trials")
    manager.stop(block=True, timeout=2)
