"""Checks that a request can ever run, before it is queued."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What bounds a request; the same on the engine and on a driver in another process."""

    vocab_size: int
    max_model_len: int
    num_cache_tokens: int  # KV cache blocks x block size
    block_size: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool


def validate_request(
    prompt_token_ids: list[int], params: SamplingParams, limits: RequestLimits
) -> None:
    """Raise ValueError (saying which limit) if the request can never run."""
    if not prompt_token_ids:
        raise ValueError("prompt must not be empty")
    if any(not 0 <= t < limits.vocab_size for t in prompt_token_ids):
        raise ValueError(f"prompt_token_ids must be in [0, {limits.vocab_size})")
    # Counts of tokens the sampler picks from the vocabulary (top_k past it keeps them all).
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > limits.vocab_size:
            raise ValueError(f"{name} must be <= the vocabulary size ({limits.vocab_size})")
    num = len(prompt_token_ids)
    if num >= limits.max_model_len:
        raise ValueError(
            f"prompt is {num} tokens, which leaves no room to generate within "
            f"max_model_len ({limits.max_model_len})"
        )
    if not limits.enable_chunked_prefill and num > limits.max_num_batched_tokens:
        raise ValueError(
            f"prompt is {num} tokens, more than max_num_batched_tokens "
            f"({limits.max_num_batched_tokens}) with chunked prefill off"
        )
    total = min(num + (params.max_tokens or limits.max_model_len), limits.max_model_len)
    blocks = -(-total // limits.block_size)
    if blocks * limits.block_size > limits.num_cache_tokens:
        raise ValueError(
            f"prompt + max_tokens ({total} tokens) needs more KV cache than exists "
            f"({limits.num_cache_tokens} tokens)"
        )
