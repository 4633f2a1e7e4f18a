"""The detokenizer's fast path (the Rust tokenizer called directly) gives transformers' text."""

from __future__ import annotations

import random
from pathlib import Path

from engine.detokenizer import Detokenizer
from engine.model_files import load_tokenizer

DEMO_MODEL = Path(__file__).resolve().parents[2] / "benchmarks" / "demo_model" / "model"


def test_fast_decode_matches_transformers():
    tokenizer = load_tokenizer(str(DEMO_MODEL), None)
    detokenizer = Detokenizer(tokenizer)
    rng = random.Random(0)
    special = list(tokenizer.all_special_ids)
    for _ in range(500):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 16))]
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        for skip in (False, True):
            assert detokenizer._decode(ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_tokenizer_that_overrides_decoding_keeps_its_own():
    tokenizer = load_tokenizer(str(DEMO_MODEL), None)

    class Shouting(type(tokenizer)):
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super()._decode(token_ids, skip_special_tokens, **kwargs).upper()

    tokenizer.__class__ = Shouting
    ids = tokenizer.encode("quiet words", add_special_tokens=False)
    assert Detokenizer(tokenizer)._decode(ids, False) == "QUIET WORDS"
