"""The Triton attention, cache-write and fused elementwise kernels against the engine's portable
PyTorch layers (themselves checked against transformers by the oracle tests).

Skipped where no GPU is present (CI). TRITON_INTERPRET=1 runs them on CPU in float32 with
numpy < 2.4 (numpy 2.4 no longer turns the interpreter's one-element scalars into loop bounds),
all but the fp8-cache cases (the interpreter rounds to fp8 its own way)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import kernels_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not kernels_available(), reason="needs a CUDA GPU and Triton"),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.bfloat16, torch.float16] if DEVICE.type == "cuda" else [torch.float32]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    return torch.allclose(actual.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_fused_residual(dtype):
    from engine.kernels.fused_ops import rms_norm
    from engine.layers.norm import RMSNorm

    norm = RMSNorm(4096, 1e-5).to(DEVICE, dtype)
    norm.weight.data.normal_()
    x = torch.randn(7, 4096, device=DEVICE, dtype=dtype)
    residual = torch.randn(7, 4096, device=DEVICE, dtype=dtype)
    assert close(rms_norm(x, norm.weight, 1e-5), norm.forward_native(x), dtype)
    summed = x + residual
    fused_residual = residual.clone()
    out = rms_norm(x, norm.weight, 1e-5, fused_residual)
    assert torch.equal(fused_residual, summed)
    assert close(out, norm.forward_native(summed), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_sample_is_argmax_and_its_log_softmax(dtype):
    """One kernel against the sampler's general path: torch's argmax (ties to the lower index)
    and log_softmax, on rows of strided logits whose vocabulary ends mid-block, with ties
    within a block and across blocks."""
    from engine.kernels.greedy_sample import BLOCK, greedy_sample

    vocab = 2 * BLOCK + 123
    logits = torch.randn(6, vocab + 5, device=DEVICE, dtype=dtype)[:, :vocab]
    logits[1, 7] = logits[1, 9] = 40.0  # a tie inside one block
    logits[2, 3] = logits[2, BLOCK + 3] = 40.0  # a tie across blocks
    logits[3, vocab - 1] = 40.0  # the max in the last, partial block
    logits[4] = -1e4  # a flat row: every entry ties
    tokens, logprobs = greedy_sample(logits)
    expected = logits.float().argmax(dim=-1)
    assert torch.equal(tokens, expected)
    assert tokens[1] == 7 and tokens[2] == 3 and tokens[3] == vocab - 1 and tokens[4] == 0
    reference = torch.log_softmax(logits.float(), dim=-1).gather(1, expected[:, None])[:, 0]
    assert torch.allclose(logprobs, reference, rtol=1e-5, atol=1e-5)


def test_sampler_takes_the_greedy_kernel_only_where_it_applies():
    """With the kernels on, plain greedy rows get the general path's tokens and
    log-probabilities from the one kernel; a step where a row asks for top logprobs takes the
    general path (its ranks and top-k come back)."""
    from engine.sampler import Sampler
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence

    def seq(**params) -> Sequence:
        return Sequence(0, "r", 0, [1, 2, 3], 3, SamplingParams(**params), frozenset(), 0.0)

    logits = torch.randn(3, 1000, device=DEVICE)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    greedy = [seq(temperature=0) for _ in range(3)]
    fast = Sampler(use_kernels=True).sample(logits, greedy, generator)
    general = Sampler().sample(logits, greedy, generator)
    assert torch.equal(fast.token_ids, general.token_ids)
    assert torch.allclose(fast.results[0], general.results[0], rtol=1e-5, atol=1e-5)
    mixed = greedy[:2] + [seq(temperature=0, logprobs=2)]
    out = Sampler(use_kernels=True).sample(logits, mixed, generator)
    assert out.logprob_rows == [2] and len(out.results) == 4
    assert torch.equal(out.token_ids, general.token_ids)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    from engine.kernels.fused_ops import silu_and_mul
    from engine.layers.activation import SiluAndMul

    x = torch.randn(5, 2 * 11008, device=DEVICE, dtype=dtype)
    assert close(silu_and_mul(x), SiluAndMul().forward_native(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8), (14, 2)])
def test_rotary_in_place(dtype, heads, kv_heads):
    from engine.kernels.fused_ops import rotary_embedding_
    from engine.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(128, 4096, 500000.0, None).to(DEVICE)
    tokens = 9
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * 128, device=DEVICE, dtype=dtype)
    positions = torch.tensor([0, 1, 2, 17, 100, 511, 4000, 5, 3], device=DEVICE)
    q = qkv[:, : heads * 128].view(tokens, heads, 128)
    k = qkv[:, heads * 128 : (heads + kv_heads) * 128].view(tokens, kv_heads, 128)
    expected_q, expected_k = rope.forward_native(positions, q.clone(), k.clone())
    rotary_embedding_(positions, q, k, rope.cos, rope.sin)
    assert close(q, expected_q, dtype) and close(k, expected_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,window,cache_dtype",
    [(32, 32, None, None), (32, 8, None, None), (8, 2, 20, None),
     (32, 8, None, torch.float8_e4m3fn), (8, 2, 20, torch.float8_e5m2)],
)  # fmt: skip
@pytest.mark.parametrize("num_splits", [None, 1, 2, 8])
def test_paged_decode_matches_sdpa_path(dtype, heads, kv_heads, window, cache_dtype, num_splits):
    """Decode queries over shuffled cache blocks: the kernel equals the portable attention, also
    over an fp8 cache (kv_cache_dtype), which both round and widen the same way, and with each
    sequence's context split over several programs (8: more splits than some contexts have
    tiles, so some splits are empty)."""
    if cache_dtype is not None and DEVICE.type != "cuda":
        pytest.skip("Triton's interpreter rounds to fp8 its own way; GPUs run these cases")
    from engine.forward_context import AttentionBatch, AttentionMetadata, set_forward_context
    from engine.kernels.paged_attention import paged_decode_attention, store_kv_cache
    from engine.layers.attention import Attention

    torch.manual_seed(0)
    head_dim, block_size, num_blocks = 128, 16, 64
    context_lens = [1, 17, 64, 130, 33]
    attn = Attention(heads, head_dim, kv_heads, head_dim**-0.5, window)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    cache = cache.to(cache_dtype or dtype)
    blocks = torch.randperm(num_blocks).tolist()
    tables, slots = [], []
    for n in context_lens:
        count = -(-n // block_size)
        tables.append([blocks.pop() for _ in range(count)])
        slots.append(tables[-1][(n - 1) // block_size] * block_size + (n - 1) % block_size)
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)
    lens = torch.tensor(context_lens, device=DEVICE)
    slot_mapping = torch.tensor(slots, device=DEVICE)
    seqs = len(context_lens)
    q = torch.randn(seqs, heads, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(seqs, kv_heads * head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(seqs, kv_heads * head_dim, device=DEVICE, dtype=dtype)

    attn.kv_cache = cache.clone()
    batch = AttentionBatch(
        0, seqs, torch.arange(seqs, device=DEVICE), (lens - 1).view(-1, 1), padded, lens
    )
    with set_forward_context(AttentionMetadata(slot_mapping, [batch])):
        expected = attn.forward_native(q.flatten(1), k, v).view(seqs, heads, head_dim)

    kernel_cache = cache.clone()
    store_kv_cache(k, v, kernel_cache[0], kernel_cache[1], slot_mapping)
    assert torch.equal(kernel_cache, attn.kv_cache)
    out = paged_decode_attention(
        q, kernel_cache[0], kernel_cache[1], padded, lens, head_dim**-0.5, window, num_splits
    )
    assert close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,window,cache_dtype",
    [(32, 8, None, None), (8, 8, None, None), (8, 2, 20, None),
     (32, 32, None, torch.float8_e4m3fn), (8, 2, 20, torch.float8_e5m2)],
)  # fmt: skip
@pytest.mark.parametrize("num_splits", [1, 2, 8])
def test_decode_kernel_rotates_and_writes_the_new_token(
    dtype, heads, kv_heads, window, cache_dtype, num_splits
):
    """The decode kernel handed the step's query, key and value before the rotary embedding
    (NewTokens) equals rotating them, writing the cache and then attending, as the portable
    layers do: same output, same cache bytes. The last row is CUDA-graph padding (slot -1, no
    context): zeros out, nothing written. Over an fp8 cache (a bf16 query: the kernel's dots
    run in fp16) the output still equals the portable layers' (bf16 over the widened cache); a
    written key may round to the fp8 value next to theirs (the rotary's last bf16 bit)."""
    if cache_dtype is not None and DEVICE.type != "cuda":
        pytest.skip("Triton's interpreter rounds to fp8 its own way; GPUs run these cases")
    from engine.forward_context import AttentionBatch, AttentionMetadata, set_forward_context
    from engine.kernels.paged_attention import NewTokens, paged_decode_attention
    from engine.layers.attention import Attention
    from engine.layers.rotary import RotaryEmbedding

    torch.manual_seed(1)
    head_dim, block_size, num_blocks = 128, 16, 64
    context_lens = [1, 17, 64, 130, 33]
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, None).to(DEVICE)
    attn = Attention(heads, head_dim, kv_heads, head_dim**-0.5, window)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    cache = cache.to(cache_dtype or dtype)
    blocks = torch.randperm(num_blocks).tolist()
    tables, slots = [], []
    for n in context_lens:
        tables.append([blocks.pop() for _ in range(-(-n // block_size))])
        slots.append(tables[-1][(n - 1) // block_size] * block_size + (n - 1) % block_size)
    width = max(map(len, tables))
    tables.append([0] * width)  # the padding row
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)
    lens = torch.tensor(context_lens + [0], device=DEVICE)
    slot_mapping = torch.tensor(slots + [-1], device=DEVICE)
    positions = (lens - 1).clamp(min=0)
    seqs = len(context_lens) + 1
    # q, k, v as views of one fused projection output, as the model hands them over.
    qkv = torch.randn(seqs, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)

    attn.kv_cache = cache.clone()
    batch = AttentionBatch(0, seqs, torch.arange(seqs, device=DEVICE), positions.view(-1, 1),
                           padded, lens)  # fmt: skip
    with set_forward_context(AttentionMetadata(slot_mapping, [batch])):
        expected = attn.forward_native(q, k, v, positions, rope).view(seqs, heads, head_dim)

    kernel_cache = cache.clone()
    new = NewTokens(positions, rope.cos, rope.sin, k, v, slot_mapping)
    out = paged_decode_attention(
        q.view(seqs, heads, head_dim), kernel_cache[0], kernel_cache[1], padded, lens,
        head_dim**-0.5, window, num_splits, rotary=new,
    )  # fmt: skip
    # The new tokens' slots hold the rotated keys and the values (up to the rounding of a fused
    # multiply-add on a GPU, as the rotary kernel), every other slot is untouched.
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slot_mapping[:-1]] = True
    written = written.view(num_blocks, block_size)
    if cache_dtype is None:
        assert torch.equal(kernel_cache[:, ~written], cache[:, ~written])
        assert close(kernel_cache[:, written], attn.kv_cache[:, written], dtype)
    else:  # compared as bytes: all but the new keys, which may be one fp8 step apart
        raw, raw_before = kernel_cache.view(torch.uint8), cache.view(torch.uint8)
        assert torch.equal(raw[:, ~written], raw_before[:, ~written])
        assert torch.equal(raw[1, written], attn.kv_cache.view(torch.uint8)[1, written])
        step = torch.finfo(cache_dtype).eps  # relative spacing: 1/8 e4m3, 1/4 e5m2
        actual, wanted = kernel_cache[0].float()[written], attn.kv_cache[0].float()[written]
        assert torch.allclose(actual, wanted, rtol=step, atol=1e-2)
    assert close(out[:-1], expected[:-1], dtype)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert torch.equal(qkv, torch.cat([q, k, v], dim=1))  # the inputs are left as they were


@pytest.mark.parametrize(
    "q_dtype,cache_dtype,fp16_dots",
    [(torch.bfloat16, torch.float8_e4m3fn, True), (torch.bfloat16, torch.float8_e5m2, False),
     (torch.float16, torch.float8_e4m3fn, False), (torch.float32, torch.float8_e4m3fn, False),
     (torch.bfloat16, torch.bfloat16, False)],
)  # fmt: skip
def test_fp16_dots_only_for_a_bf16_query_over_an_e4m3_cache(
    monkeypatch, q_dtype, cache_dtype, fp16_dots
):
    """The launcher runs the dots in fp16 (FP16_DOTS) for a bf16 query over an e4m3 cache and
    nowhere else (e5m2 widens to bf16 without conversions), and the kernel then still gives the
    attention over the widened cache, computed here in float64."""
    import engine.kernels.paged_attention as paged_attention

    seen = []
    kernel = paged_attention._paged_decode

    class Spy:  # the real kernel, its FP16_DOTS argument noted
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                seen.append(kwargs["FP16_DOTS"])
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(paged_attention, "_paged_decode", Spy())
    torch.manual_seed(4)
    lens = [40, 77]
    cache = torch.randn(2, 12, 16, 2, 128, device=DEVICE).to(cache_dtype)
    tables = torch.tensor([[3, 5, 7, 0, 0], [1, 2, 4, 6, 8]], device=DEVICE)
    q = torch.randn(2, 4, 128, device=DEVICE).to(q_dtype)
    out = paged_attention.paged_decode_attention(
        q, cache[0], cache[1], tables, torch.tensor(lens, device=DEVICE), 128**-0.5, num_splits=1
    )
    assert seen == [fp16_dots]
    if DEVICE.type != "cuda" and q_dtype == torch.bfloat16 and not fp16_dots:
        return  # Triton's interpreter gets bf16 dots wrong (it gets fp16 and fp32 ones right)
    expected = []
    for seq, n in enumerate(lens):
        slots = tables[seq, torch.arange(n) // 16] * 16 + torch.arange(n, device=DEVICE) % 16
        k, v = (c.flatten(0, 1)[slots].double().repeat_interleave(2, dim=1) for c in cache)
        scores = torch.einsum("hd,thd->ht", q[seq].double(), k) * 128**-0.5
        expected.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v))
    tolerance = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}[q_dtype]
    assert torch.allclose(out.double(), torch.stack(expected), rtol=tolerance, atol=tolerance)


def test_split_combine_over_many_launches():
    """The last split of each (sequence, KV head) combines the others' sums after counting them
    with an atomic; over many launches of one sequence's heads (few programs: they run
    concurrently, in varying order) the result must equal the unsplit kernel's every time, and
    every count must be back at zero."""
    from engine.kernels.paged_attention import paged_decode_attention, split_counts

    torch.manual_seed(2)
    dtype = DTYPES[0]
    cache = torch.randn(2, 64, 16, 8, 128, device=DEVICE, dtype=dtype)
    tables = torch.randperm(64, device=DEVICE)[:40].view(2, 20)
    lens = torch.tensor([300, 77], device=DEVICE)
    q = torch.randn(2, 32, 128, device=DEVICE, dtype=dtype)
    expected = paged_decode_attention(q, cache[0], cache[1], tables, lens, 0.088, num_splits=1)
    for _ in range(200 if DEVICE.type == "cuda" else 3):
        out = paged_decode_attention(q, cache[0], cache[1], tables, lens, 0.088, num_splits=8)
        assert close(out, expected, dtype)
    assert not split_counts(16, DEVICE).any()


@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_empty_row_is_zero(num_splits):
    """CUDA-graph padding rows have no context: they must give zeros, not NaN (split or not)."""
    from engine.kernels.paged_attention import paged_decode_attention

    cache = torch.randn(2, 4, 16, 2, 64, device=DEVICE)
    q = torch.randn(2, 4, 64, device=DEVICE)
    tables = torch.zeros(2, 1, dtype=torch.long, device=DEVICE)
    out = paged_decode_attention(
        q, cache[0], cache[1], tables, torch.tensor([0, 5], device=DEVICE), 0.125,
        num_splits=num_splits,
    )  # fmt: skip
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,window,cache_dtype",
    [(32, 32, None, None), (32, 8, None, None), (8, 2, 20, None), (12, 3, None, None),
     (32, 8, None, torch.float8_e4m3fn)],
)  # fmt: skip
def test_paged_prefill_matches_sdpa_path(dtype, heads, kv_heads, window, cache_dtype):
    """A prefill group over shuffled cache blocks: whole prompts, chunks after cached tokens
    (queries that start mid-block and cross tiles), a one-token query among long ones, in a
    sliding window or not: the kernel equals the portable attention (SDPA over the gathered
    blocks, a boolean causal mask). 12 heads over 3: a group of 4, padded rows in between."""
    if cache_dtype is not None and DEVICE.type != "cuda":
        pytest.skip("Triton's interpreter rounds to fp8 its own way; GPUs run these cases")
    from engine.forward_context import AttentionBatch, AttentionMetadata, set_forward_context
    from engine.kernels.paged_attention import store_kv_cache
    from engine.kernels.paged_prefill import paged_prefill_attention
    from engine.layers.attention import Attention

    torch.manual_seed(3)
    head_dim, block_size, num_blocks = 128, 16, 96
    # (tokens already cached, tokens of this step)
    steps = [(0, 37), (17, 20), (64, 1), (100, 90), (0, 130)]
    attn = Attention(heads, head_dim, kv_heads, head_dim**-0.5, window)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    cache = cache.to(cache_dtype or dtype)
    blocks = torch.randperm(num_blocks).tolist()
    max_q = max(n for _, n in steps)
    tables, slots, flat, query_positions = [], [], [], []
    for j, (cached, n) in enumerate(steps):
        tables.append([blocks.pop() for _ in range(-(-(cached + n) // block_size))])
        slots += [tables[-1][p // block_size] * block_size + p % block_size
                  for p in range(cached, cached + n)]  # fmt: skip
        flat += range(j * max_q, j * max_q + n)
        query_positions.append(list(range(cached, cached + n)) + [0] * (max_q - n))
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)
    lens = torch.tensor([c + n for c, n in steps], device=DEVICE)
    slot_mapping = torch.tensor(slots, device=DEVICE)
    tokens = len(slots)
    q = torch.randn(tokens, heads, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(tokens, kv_heads * head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(tokens, kv_heads * head_dim, device=DEVICE, dtype=dtype)
    flat_index = torch.tensor(flat, device=DEVICE)
    positions = torch.tensor(query_positions, device=DEVICE)

    attn.kv_cache = cache.clone()
    batch = AttentionBatch(0, tokens, flat_index, positions, padded, lens)
    with set_forward_context(AttentionMetadata(slot_mapping, [batch])):
        expected = attn.forward_native(q.flatten(1), k, v).view(tokens, heads, head_dim)

    kernel_cache = cache.clone()
    store_kv_cache(k, v, kernel_cache[0], kernel_cache[1], slot_mapping)
    out = paged_prefill_attention(
        q, kernel_cache[0], kernel_cache[1], flat_index, positions, padded, lens,
        head_dim**-0.5, window,
    )  # fmt: skip
    assert close(out, expected, dtype)

    # The layer's kernel path: the cache write, then the kernel with the step's query rows,
    # kept on the batch for the step's other layers.
    attn.kv_cache, attn.use_kernels = cache.clone(), True
    batch = AttentionBatch(0, tokens, flat_index, positions, padded, lens)
    with set_forward_context(AttentionMetadata(slot_mapping, [batch])):
        via_layer = attn.forward(q.flatten(1), k, v).view(tokens, heads, head_dim)
    assert batch.query_rows is not None and torch.equal(via_layer, out)
    assert torch.equal(attn.kv_cache, kernel_cache)
