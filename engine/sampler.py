"""Turns a step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeded sampling,
and the log-probabilities requested with them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sequence import Sequence
from engine.transfer import to_device


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float  # raw model log-probability of the token
    top_logprobs: dict[int, tuple[float, int]] | None  # token -> (logprob, rank), incl. token_id


@dataclass(slots=True)
class SamplerOutput:
    """One step's choices, and the log-probabilities asked for with them, as device tensors. On
    CUDA they are already being copied to pinned host memory behind the step on its stream:
    reading them back waits for this step only, not for a step launched after it (a plain
    device-to-host read would queue behind that one)."""

    token_ids: torch.Tensor  # [rows] long, on the device (a followup step's input)
    seqs: list[Sequence]
    logprob_rows: list[int]  # rows whose sequences asked for logprobs
    # chosen logprob [rows]; for logprob_rows: chosen rank, top-k values, top-k ids.
    results: tuple[torch.Tensor, ...]
    host: tuple[torch.Tensor, ...] | None = None  # pinned copies of (token_ids, *results)
    ready: torch.cuda.Event | None = None  # recorded after the copies to the host

    def start_copy_to_host(self) -> None:
        if self.token_ids.device.type != "cuda":
            return
        tensors = (self.token_ids, *self.results)
        self.host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
        for host, tensor in zip(self.host, tensors, strict=True):
            host.copy_(tensor, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def tokens(self) -> list[SampledToken]:
        """Read the choices back (waits for the step to finish)."""
        if self.ready is not None:
            self.ready.synchronize()
        tensors = self.host if self.host is not None else (self.token_ids, *self.results)
        token_list, chosen, *top = [t.tolist() for t in tensors]
        tops: dict[int, dict[int, tuple[float, int]]] = {}
        if self.logprob_rows:
            ranks, values, ids = top
            for j, i in enumerate(self.logprob_rows):
                k = self.seqs[i].params.logprobs
                tops[i] = logprob_entry(token_list[i], chosen[i], ranks[j], values[j], ids[j], k)
        return [SampledToken(tok, chosen[i], tops.get(i)) for i, tok in enumerate(token_list)]


class Sampler:
    """Logprobs are the model's raw log-softmax (before penalties and temperature), as vLLM
    reports them; the choice itself uses the processed distribution. With `use_kernels`, a step
    where every row is greedy, none needs penalties and none asks for top logprobs takes one
    kernel (`kernels/greedy_sample.py`) instead of the general path's four."""

    def __init__(self, use_kernels: bool = False) -> None:
        self.use_kernels = use_kernels

    def warm_up(self, logits: torch.Tensor) -> None:
        """Compile the greedy kernel for logits like these (a step's, as the model returns them)."""
        if self.use_kernels:
            from engine.kernels.greedy_sample import greedy_sample

            greedy_sample(logits)

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator
    ) -> list[SampledToken]:
        return self.sample(logits, seqs, generator).tokens()

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        generator: torch.Generator,
        in_flight: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Choose each row's token without waiting for the GPU (decisions that depend on the
        parameters are made from them, on the host)."""
        if self.use_kernels and self._plain_greedy(seqs, in_flight):
            from engine.kernels.greedy_sample import greedy_sample

            token_ids, chosen = greedy_sample(logits)
            output = SamplerOutput(token_ids, seqs, [], (chosen,))
            output.start_copy_to_host()
            return output
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_penalties(logits, seqs, in_flight)
        device = logits.device
        greedy = [i for i, s in enumerate(seqs) if s.params.is_greedy]
        if len(greedy) == len(seqs):  # the common decode case: one argmax, no indexing
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = torch.empty(len(seqs), dtype=torch.long, device=device)
            if greedy:
                rows = to_device(greedy, torch.long, device)
                token_ids[rows] = logits[rows].argmax(dim=-1)
        random = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
        if random:
            rows = to_device(random, torch.long, device)
            probs = self._processed_probs(logits[rows], [seqs[i] for i in random])
            for row, i in enumerate(random):
                gen = seqs[i].generator or generator
                # argmax(p / q) with q ~ Exp(1) is a draw from p (the exponential race).
                q = torch.empty_like(probs[row]).exponential_(generator=gen)
                token_ids[i] = (probs[row] / q).argmax()
        chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        results: tuple[torch.Tensor, ...] = (chosen,)
        logprob_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if logprob_rows:
            rows = to_device(logprob_rows, torch.long, device)
            k = max(seqs[i].params.logprobs for i in logprob_rows)
            _, ranks, values, ids = logprob_tensors(raw_logprobs[rows], token_ids[rows], k)
            results = (chosen, ranks, values, ids)
        output = SamplerOutput(token_ids, seqs, logprob_rows, results)
        output.start_copy_to_host()
        return output

    @staticmethod
    def _plain_greedy(seqs: list[Sequence], in_flight: torch.Tensor | None) -> bool:
        """Every row greedy, with no penalties, min_tokens or top logprobs to apply."""
        extra = 0 if in_flight is None else 1
        return all(
            s.params.is_greedy
            and s.params.logprobs is None
            and not needs_logit_processing(s, extra)
            for s in seqs
        )

    def _apply_penalties(
        self, logits: torch.Tensor, seqs: list[Sequence], in_flight: torch.Tensor | None
    ) -> torch.Tensor:
        """The logits with penalties and min_tokens applied: a copy, or the same tensor where
        no sequence needs either (no copy on the common path). `in_flight` ([rows], on the
        device): each sequence's newest token where it is not in seq.token_ids yet (a step
        launched ahead of the read-back); it counts as an output token."""
        extra = 0 if in_flight is None else 1
        if not any(needs_logit_processing(s, extra) for s in seqs):
            return logits
        logits = logits.clone()
        device, vocab = logits.device, logits.shape[1]
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=device)
                seen[to_device(sorted(set(seq.token_ids)), torch.long, device)] = True
                if in_flight is not None:
                    seen[in_flight[i]] = True
                row = logits[i]
                penalized = torch.where(
                    row > 0, row / p.repetition_penalty, row * p.repetition_penalty
                )
                logits[i] = torch.where(seen, penalized, row)
            if (p.frequency_penalty or p.presence_penalty) and seq.num_output_tokens + extra:
                counts = torch.zeros(vocab, dtype=logits.dtype, device=device)
                if seq.num_output_tokens:
                    out = to_device(seq.output_token_ids, torch.long, device)
                    counts += torch.bincount(out, minlength=vocab)[:vocab]
                if in_flight is not None:
                    counts[in_flight[i]] += 1
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            if seq.num_output_tokens + extra < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else seq.eos_token_ids)
                banned = [t for t in banned if t < vocab]
                logits[i, to_device(banned, torch.long, device)] = float("-inf")
        return logits

    def _processed_probs(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        temperature = to_device([s.params.temperature for s in seqs], torch.float32, device)
        logits = logits / temperature.unsqueeze(1)
        top_k = [s.params.top_k for s in seqs]
        if any(top_k):
            # As in vLLM, a top_k past the vocabulary keeps every token.
            vocab = logits.shape[1]
            k = to_device([min(t, vocab) if t else vocab for t in top_k], torch.long, device)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if any(s.params.top_p < 1.0 for s in seqs):
            top_p = to_device([s.params.top_p for s in seqs], torch.float32, device)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always the top token).
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p.unsqueeze(1)
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
        if any(s.params.min_p > 0 for s in seqs):
            min_p = to_device([s.params.min_p for s in seqs], torch.float32, device)
            threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs / probs.sum(dim=-1, keepdim=True)


def needs_logit_processing(seq: Sequence, in_flight: int = 0) -> bool:
    """Whether seq's next token needs penalties or min_tokens (`in_flight`: output tokens not
    yet in seq.token_ids)."""
    p = seq.params
    num_outputs = seq.num_output_tokens + in_flight
    return (
        p.repetition_penalty != 1.0
        or bool((p.frequency_penalty or p.presence_penalty) and num_outputs)
        or num_outputs < p.min_tokens
    )


def logprob_tensors(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of log-probabilities [rows, vocab] (on the device, no sync): that row's token's
    log-probability and 1-based rank, and the top-k values and ids."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=1) + 1
    values, ids = logprobs.topk(k, dim=-1)  # k may be 0: empty
    return chosen.squeeze(1), ranks, values, ids


def logprob_entry(
    token_id: int, logprob: float, rank: int, values: list[float], ids: list[int], k: int
) -> dict[int, tuple[float, int]]:
    """One position's top-k entries, plus token_id, with 1-based ranks (host lists of one row of
    logprob_tensors)."""
    entry = {token_id: (logprob, rank)}
    for r, (v, t) in enumerate(zip(values[:k], ids[:k], strict=True), start=1):
        entry.setdefault(t, (v, r))
    return entry
