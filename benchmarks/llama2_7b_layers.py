"""The Llama-2-7B linear layers the 4-bit matmul benchmarks run, quantized as the engine holds
them (shared by tune_matmul_4bit.py and linear_4bit.py)."""

from __future__ import annotations

from typing import NamedTuple

import bitsandbytes.functional as bnbF
import torch

from benchmarks.graph_timing import copies_for
from engine.kernels.decode_4bit import code_table

# Llama-2-7B linears as nibble runs them (q/k/v and gate/up merged): (N, K).
LLAMA2_7B = {
    "qkv": (12288, 4096),
    "o": (4096, 4096),
    "gate_up": (22016, 4096),
    "down": (4096, 11008),
}


class QuantizedLayer(NamedTuple):
    packed: torch.Tensor  # uint8, N*K/2
    absmax: torch.Tensor  # fp32, de-nested as the engine's loader does
    table: torch.Tensor  # the decoder's code table
    state: bnbF.QuantState  # bitsandbytes' own (nested) state, as users call its matmul with
    reference: torch.Tensor  # bnb's dequantized bf16 weight


def quantized_layer(n: int, k: int, device: torch.device) -> QuantizedLayer:
    """A seeded-by-caller random [N, K] weight in NF4 + double quantization, blocksize 64."""
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    absmax = (bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    reference = bnbF.dequantize_4bit(packed, state)
    return QuantizedLayer(
        packed.view(-1), absmax.view(-1), code_table(state.code, device), state, reference
    )


def weight_copies(layer: QuantizedLayer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Enough copies of a layer's packed bytes and absmax that they do not fit in L2."""
    count = copies_for(layer.packed.numel() + 4 * layer.absmax.numel())
    return [(layer.packed.clone(), layer.absmax.clone()) for _ in range(count)]
