"""Incremental detokenization and the stop conditions that need text."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

try:  # transformers 5: the tokenizers-backed class
    from transformers.tokenization_utils_tokenizers import TokenizersBackend as _FastTokenizer
except ImportError:  # transformers 4
    from transformers import PreTrainedTokenizerFast as _FastTokenizer

from engine.sequence import Sequence

_PREFIX_WINDOW = 5  # tokens of context decoded before the new ones, so spaces and merges are right


def _fast_decode(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int], bool], str]:
    """`decode(ids, skip_special_tokens)`: the Rust tokenizer's own where transformers' decode
    would only wrap it (a fast tokenizer without space clean-up), else transformers'. The wrapper
    costs 3x the decode itself, and a step decodes twice per running sequence."""
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    plain = (  # a subclass that overrides decoding keeps its own
        isinstance(tokenizer, _FastTokenizer)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is _FastTokenizer._decode
    )
    if plain and isinstance(backend, Tokenizer) and not tokenizer.clean_up_tokenization_spaces:
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._decode = _fast_decode(tokenizer)
        self.decode_token = lru_cache(maxsize=65536)(self._decode_one)

    def _decode_one(self, token_id: int) -> str:
        return self._decode([token_id], False)

    def start(self, seq: Sequence) -> None:
        seq.prefix_offset = max(seq.num_prompt_tokens - _PREFIX_WINDOW, 0)
        seq.read_offset = seq.num_prompt_tokens

    def _decode_window(self, seq: Sequence) -> tuple[str, str]:
        """(text of the context tokens, text of context + unread tokens)."""
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids
        prefix = self._decode(ids[seq.prefix_offset : seq.read_offset], skip)
        return prefix, self._decode(ids[seq.prefix_offset :], skip)

    def step(self, seq: Sequence) -> str:
        """Append the text of seq's newest tokens to seq.text; return what was appended. Text that
        ends inside a multi-byte UTF-8 character is held back until the character is complete."""
        prefix, full = self._decode_window(seq)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        seq.prefix_offset = seq.read_offset
        seq.read_offset = seq.num_tokens
        seq.text += delta
        return delta

    def flush(self, seq: Sequence) -> None:
        """At the end, add text still held back (an incomplete character decodes as U+FFFD)."""
        if seq.read_offset >= seq.num_tokens:
            return
        prefix, full = self._decode_window(seq)
        seq.text += full[len(prefix) :]
        seq.prefix_offset = seq.read_offset = seq.num_tokens


def check_stop(seq: Sequence, delta_len: int, max_model_len: int) -> None:
    """Set seq.finish_reason (and stop_reason) if its newest token ends it; trims a stop string."""
    params = seq.params
    token = seq.token_ids[-1]
    if seq.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token in seq.eos_token_ids:
            seq.finish_reason = "stop"
            return
        if token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return
        if params.stop_strings and delta_len:
            if _truncate_at_stop_string(seq, delta_len):
                return
    if reaches_length_limit(seq, max_model_len):
        seq.finish_reason = "length"


def reaches_length_limit(seq: Sequence, max_model_len: int, pending: int = 0) -> bool:
    """Whether seq, with `pending` more tokens than it holds (a token in flight), is at its
    max_tokens or at the model's max_model_len."""
    limit = seq.params.max_tokens
    return (limit is not None and seq.num_output_tokens + pending >= limit) or (
        seq.num_tokens + pending >= max_model_len
    )


def _truncate_at_stop_string(seq: Sequence, delta_len: int) -> bool:
    params = seq.params
    # A stop string may straddle the old text and the new delta.
    search_from = max(0, len(seq.text) - delta_len - params.max_stop_len + 1)
    best: tuple[int, str] | None = None
    for stop in params.stop_strings:
        index = seq.text.find(stop, search_from)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return False
    index, stop = best
    end = index + len(stop) if params.include_stop_str_in_output else index
    seq.text = seq.text[:end]
    seq.finish_reason, seq.stop_reason = "stop", stop
    return True
