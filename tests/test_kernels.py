"""The Triton kernels agree with the torch versions that sim/cpu run (GPU only)."""
from __future__ import annotations

import pytest
import torch

from lockstep.engine.kernels import rms_norm, rope_kv, silu_mul
from lockstep.engine.kernels.decode_attention import decode_attention
from lockstep.engine.models.attention import AttentionMetadata, torch_paged_attention

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16]


def tolerance(dtype):
    # float32: the two differ by float32 rounding only; bfloat16: by at most one or two ulps
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(dtype, with_residual):
    x = torch.randn(7, 2048, dtype=dtype, device="cuda")
    residual = torch.randn_like(x) if with_residual else None
    w = torch.randn(2048, dtype=dtype, device="cuda")
    expected = rms_norm.add_rms_norm(x.cpu(), None if residual is None else residual.cpu(),
                                     w.cpu(), 1e-5)
    out, new_residual = rms_norm.add_rms_norm(x, residual, w, 1e-5)
    torch.testing.assert_close(out.cpu(), expected[0], **tolerance(dtype))
    torch.testing.assert_close(new_residual.cpu(), expected[1], **tolerance(dtype))
    if with_residual:
        assert new_residual.data_ptr() == residual.data_ptr()  # updated in place


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gate_up = torch.randn(5, 2 * 3000, dtype=dtype, device="cuda")  # 3000: not a block multiple
    torch.testing.assert_close(silu_mul.silu_mul(gate_up).cpu(),
                               silu_mul.silu_mul(gate_up.cpu()), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dim", [64, 80])
def test_rope_and_cache(dtype, qk_norm, dim):
    heads, kv_heads, tokens, block_size, blocks = 8, 2, 6, 4, 10
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, device="cuda")
    positions = torch.tensor([0, 3, 7, 8, 2, 1000], device="cuda")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    freqs = positions.float()[:, None] * inv_freq
    slots = torch.tensor([5, 0, 17, 33, 9, 21], device="cuda")
    norms = {} if not qk_norm else dict(q_norm=torch.randn(dim, dtype=dtype, device="cuda"),
                                        k_norm=torch.randn(dim, dtype=dtype, device="cuda"))
    cache = torch.zeros(2, blocks, block_size, kv_heads, dim, dtype=dtype, device="cuda")
    expected_cache = cache.clone()
    args = (freqs.cos(), freqs.sin())
    expected_q = rope_kv._rope_and_cache_torch(qkv, *args, expected_cache, slots, heads,
                                               kv_heads, dim, norms.get("q_norm"),
                                               norms.get("k_norm"), 1e-6)
    q = rope_kv.rope_and_cache(qkv, *args, cache, slots, heads, kv_heads, dim, eps=1e-6,
                               **norms)
    torch.testing.assert_close(q, expected_q, **tolerance(dtype))
    torch.testing.assert_close(cache, expected_cache, **tolerance(dtype))
    assert cache.abs().sum() > 0


def decode_case(rows, heads, kv_heads, dim, dtype, block_size=16, max_blocks=12):
    """A decode step's inputs: one new token per row at a random position (0 and ends of blocks
    among them), its cache slot in a shuffled block table, and random cache contents."""
    cache = torch.randn(2, rows * max_blocks + 1, block_size, kv_heads, dim, dtype=dtype,
                        device="cuda")
    positions = torch.tensor(([0, 9, 15, 180] * rows)[:rows], device="cuda")
    positions[4:] = torch.randint(0, max_blocks * block_size, (rows - 4,), device="cuda")
    tables = torch.randperm(rows * max_blocks, device="cuda").view(rows, max_blocks)
    slots = tables.gather(1, (positions // block_size)[:, None])[:, 0] * block_size \
        + positions % block_size
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, dtype=dtype, device="cuda")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    freqs = positions.float()[:, None] * inv_freq
    return dict(qkv=qkv, cos=freqs.cos(), sin=freqs.sin(), cache=cache, slots=slots,
                block_tables=tables, positions=positions[:, None])


def rope_then_torch_attention(case, heads, kv_heads, dim, norms):
    """The unfused path: rope_and_cache's torch version, then gather + SDPA."""
    cache = case["cache"].clone()
    q = rope_kv._rope_and_cache_torch(case["qkv"], case["cos"], case["sin"], cache,
                                      case["slots"], heads, kv_heads, dim, norms.get("q_norm"),
                                      norms.get("k_norm"), 1e-6)
    rows, positions = q.shape[0], case["positions"]
    meta = AttentionMetadata(case["slots"], case["block_tables"], torch.arange(rows,
                             device="cuda"), torch.zeros(rows, dtype=torch.long, device="cuda"),
                             positions, 1, case["block_tables"].shape[1] * cache.shape[2])
    return torch_paged_attention(q, cache, meta, dim ** -0.5), cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 64), (4, 4, 128), (12, 2, 80)])
@pytest.mark.parametrize("rows", [4, 300])  # keys split across programs, and not
@pytest.mark.parametrize("qk_norm", [False, True])
def test_decode_attention_matches_rope_then_gather_and_sdpa(dtype, heads, kv_heads, dim, rows,
                                                            qk_norm):
    case = decode_case(rows, heads, kv_heads, dim, dtype)
    norms = {} if not qk_norm else dict(q_norm=torch.randn(dim, dtype=dtype, device="cuda"),
                                        k_norm=torch.randn(dim, dtype=dtype, device="cuda"))
    expected, expected_cache = rope_then_torch_attention(case, heads, kv_heads, dim, norms)
    cache = case["cache"].clone()
    out = decode_attention(**dict(case, cache=cache), heads=heads, kv_heads=kv_heads, dim=dim,
                           scale=dim ** -0.5, eps=1e-6, **norms)
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    torch.testing.assert_close(cache, expected_cache, **tolerance(dtype))  # the new k and v
    # keys past a row's position, and its own slot's old contents, are never read
    block_size, tables, positions = cache.shape[2], case["block_tables"], case["positions"]
    key = torch.arange(tables.shape[1] * block_size, device="cuda")
    unread = key[None, :] >= positions  # [rows, keys]
    blocks = tables.gather(1, (key // block_size).expand(rows, -1))
    poisoned = case["cache"].clone()
    poisoned[:, blocks[unread], (key % block_size).expand(rows, -1)[unread]] = float("nan")
    assert decode_attention(**dict(case, cache=poisoned), heads=heads, kv_heads=kv_heads,
                            dim=dim, scale=dim ** -0.5, eps=1e-6, **norms).equal(out)


def test_programmatic_launch_changes_no_bit_of_a_captured_layer(monkeypatch):
    """The kernels of a decode layer, replayed from a CUDA graph with and without PDL: each
    kernel reads what the one before it wrote, so a kernel that read before its wait would
    differ. PDL is on wherever the GPU has it (sm_90 and later)."""
    from lockstep.engine import kernels
    q_heads, kv_heads, dim, rows = 32, 8, 64, 8
    case = decode_case(rows, q_heads, kv_heads, dim, torch.bfloat16)
    x = torch.randn(rows, q_heads * dim, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(q_heads * dim, dtype=torch.bfloat16, device="cuda")
    qkv_weight = torch.randn((q_heads + 2 * kv_heads) * dim, q_heads * dim,
                             dtype=torch.bfloat16, device="cuda") / 45

    def layer():  # on copies: add_rms_norm updates the residual (here x itself) in place
        layer_cache = case["cache"].clone()
        h, residual = rms_norm.add_rms_norm(x.clone(), None, w, 1e-5)
        out = decode_attention(**dict(case, qkv=h @ qkv_weight.T, cache=layer_cache),
                               heads=q_heads, kv_heads=kv_heads, dim=dim, scale=dim ** -0.5)
        h, residual = rms_norm.add_rms_norm(out.reshape(rows, -1), residual, w, 1e-5)
        return silu_mul.silu_mul(h), layer_cache

    def replayed():
        layer()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = layer()
        graph.replay()
        torch.cuda.synchronize()
        return result

    assert kernels.programmatic_launch(x) == (torch.cuda.get_device_capability()[0] >= 9)
    with_pdl = replayed()
    monkeypatch.setattr(kernels, "PDL_ENABLED", False)
    assert not kernels.programmatic_launch(x)
    without = replayed()
    for a, b in zip(with_pdl, without):
        assert torch.equal(a, b)
