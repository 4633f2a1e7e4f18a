"""The offline API, shaped like vLLM's: LLM(model=...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as SequenceOf
from typing import Any, TypedDict

import torch
from tqdm.auto import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


PromptType = str | TokensPrompt
ChatMessages = list[dict[str, Any]]


# Offline batches favour throughput over each step's latency: a step may take this many tokens
# (the server's default is 2048), so a batch of prompts is prefilled in fewer, larger steps, each
# dequantizing every 4-bit weight once for its tokens. vLLM's offline default is as large.
OFFLINE_MAX_NUM_BATCHED_TOKENS = 8192


class LLM:
    """Loads a model once and generates for batches of prompts.

    Pre-quantized bitsandbytes checkpoints need no arguments; a 16/32-bit checkpoint is quantized
    while loading with quantization="bitsandbytes". Extra keyword arguments are EngineConfig fields
    (max_num_seqs, gpu_memory_utilization, kv_cache_memory_bytes, quantization_config, ...);
    max_num_batched_tokens defaults to OFFLINE_MAX_NUM_BATCHED_TOKENS here."""

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: str | torch.dtype = "auto",
        quantization: str | None = None,
        load_format: str = "auto",
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        seed: int = 0,
        device: str | None = None,
        **engine_args: Any,
    ) -> None:
        if engine_args.get("max_num_batched_tokens") is None:
            engine_args["max_num_batched_tokens"] = max(
                OFFLINE_MAX_NUM_BATCHED_TOKENS, engine_args.get("max_num_seqs") or 0
            )
        config = EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, quantization=quantization,
            load_format=load_format, trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, seed=seed,
            device=device, **engine_args,
        )  # fmt: skip
        if config.tensor_parallel_size > 1:
            # One Ray actor per rank (a local Ray starts when none is running).
            from workers.group_engine import GroupEngine

            self.llm_engine = GroupEngine(config)
        else:
            self.llm_engine = LLMEngine(config)
        self._request_ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def shutdown(self) -> None:
        """Stop the worker group, if there is one."""
        if hasattr(self.llm_engine, "shutdown"):
            self.llm_engine.shutdown()

    def generate(
        self,
        prompts: PromptType | SequenceOf[PromptType],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        engine = self.llm_engine
        requests = []
        for prompt, params in zip(prompts, params_list, strict=True):
            text, token_ids = self._tokenize(prompt)
            engine.validate_prompt(token_ids, params)  # all valid before any runs
            # Only finished outputs are returned here: the engine need not build the others.
            params = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
            requests.append((str(next(self._request_ids)), text, params, token_ids))
        engine.add_requests(requests)  # one batch: a worker group's rank 0 schedules it whole
        return self._run([r[0] for r in requests], use_tqdm)

    def chat(
        self,
        messages: ChatMessages | list[ChatMessages],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        if chat_template is None and not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; pass chat_template=...")
        prompts: list[PromptType] = [
            TokensPrompt(
                prompt_token_ids=list(
                    tokenizer.apply_chat_template(
                        conversation,
                        chat_template=chat_template,
                        tokenize=True,
                        add_generation_prompt=add_generation_prompt,
                        return_dict=False,
                    )
                )
            )  # fmt: skip
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.get_tokenizer().encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = list(prompt["prompt_token_ids"])
            return self.get_tokenizer().decode(token_ids), token_ids
        raise ValueError(
            f"a prompt must be a string or {{'prompt_token_ids': [...]}}, got {prompt!r}"
        )

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        try:
            with tqdm(
                total=len(request_ids), desc="Processed prompts", disable=not use_tqdm
            ) as bar:
                while engine.has_unfinished_requests():
                    for output in engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            bar.update()
        except BaseException:  # a failed step or Ctrl-C: the next call starts from a clean engine
            for request_id in request_ids:
                if request_id not in finished:
                    engine.abort_request(request_id)
            raise
        return [finished[r] for r in request_ids]
