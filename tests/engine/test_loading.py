"""Checkpoint formats, quantization options, and the errors a user can meet while loading."""

from __future__ import annotations

import json
import shutil

import bitsandbytes.functional as bnbF
import pytest
import torch
from checkpoints import prequantize
from oracle import greedy, load_reference
from prompts import PROMPTS
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig

from engine import LLM, SamplingParams
from engine.layers.linear import LinearBase
from engine.layers.quant.bitsandbytes import BitsAndBytesLinearMethod

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _linears(llm: LLM) -> dict[str, LinearBase]:
    model = llm.llm_engine.runner.model
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearBase)}


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_sharded_checkpoint_and_weight_report(checkpoints):
    path = checkpoints("llama")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    llm = LLM(model=str(path), quantization="bitsandbytes")
    report = llm.llm_engine.runner.load_report
    assert report.quantization == "bitsandbytes-nf4-dq-inflight"
    assert report.ratio_to_16bit < 0.6
    assert all(isinstance(m.quant_method, BitsAndBytesLinearMethod) for m in _linears(llm).values())
    # device=None picks CUDA when present, else CPU.
    assert llm.llm_engine.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_vllm_examples_run_as_written(checkpoints):
    # The older vLLM example names both arguments; the newer one none, for pre-quantized files.
    prequant = checkpoints("llama-nf4-dq")
    old = LLM(model=str(prequant), quantization="bitsandbytes", load_format="bitsandbytes")
    new = LLM(model=str(prequant))
    assert old.llm_engine.runner.load_report.quantization == "bitsandbytes-nf4-dq-prequantized"
    assert _tokens(old) == _tokens(new)
    inflight = LLM(
        model=str(checkpoints("llama")), quantization="bitsandbytes", load_format="bitsandbytes"
    )
    assert inflight.llm_engine.runner.load_report.quantization.endswith("inflight")


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)]


def _inflight_as_transformers_defaults(path, skip: list[str]) -> LLM:
    """In-flight quantization as transformers' BitsAndBytesConfig defaults it (fp4, no double
    quant), float32 compute, with this skip list."""
    return LLM(
        model=str(path), dtype="float32", quantization="bitsandbytes",
        quantization_config={
            "llm_int8_skip_modules": skip, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_use_double_quant": False, "bnb_4bit_quant_type": "fp4",
        },
    )  # fmt: skip


def test_skip_modules_in_flight_and_prequantized(checkpoints, tmp_path):
    path = checkpoints("qwen2")
    skip = ["down_proj", "lm_head"]
    config = BitsAndBytesConfig(  # transformers defaults to fp4 without double quant
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip
    )
    reference = load_reference(path, config)
    inflight = _inflight_as_transformers_defaults(path, skip)
    prequant_path = prequantize(path, tmp_path / "skip", config)
    assert "model.layers.0.mlp.down_proj.weight.absmax" not in load_file(
        next(prequant_path.glob("*.safetensors"))
    )
    prequant = LLM(model=str(prequant_path), dtype="float32")
    for llm in (inflight, prequant):
        kinds = {
            n.rsplit(".", 1)[-1]: type(m.quant_method).__name__ for n, m in _linears(llm).items()
        }
        assert kinds["down_proj"] == "UnquantizedLinearMethod"
        assert kinds["gate_up_proj"] == "BitsAndBytesLinearMethod"
        for prompt, out in zip(
            PROMPTS[:4], llm.generate(PROMPTS[:4], GREEDY, use_tqdm=False), strict=True
        ):
            assert out.outputs[0].token_ids == greedy(reference, out.prompt_token_ids, 8), prompt


def test_blocksize_and_compute_dtype_are_honoured(checkpoints):
    path = checkpoints("llama")
    llm = LLM(
        model=str(path), dtype="float32", quantization="bitsandbytes",
        quantization_config={"bnb_4bit_blocksize": 128, "bnb_4bit_use_double_quant": False,
                             "bnb_4bit_compute_dtype": "bfloat16"},
    )  # fmt: skip
    layer = _linears(llm)["model.layers.0.mlp.down_proj"]
    assert layer.quant_state.blocksize == 128 and layer.compute_dtype == torch.bfloat16
    original = load_reference(path).model.layers[0].mlp.down_proj.weight.data
    packed, state = bnbF.quantize_4bit(original, blocksize=128, quant_type="nf4")
    assert torch.equal(layer.qweight.data.cpu(), packed.reshape(-1))
    assert torch.equal(layer.absmax.data.cpu(), state.absmax)
    assert llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)[0].finished


def test_checkpoint_compute_dtype_is_honoured(checkpoints, tmp_path):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    path = prequantize(checkpoints("llama"), tmp_path / "bf16", config)
    llm = LLM(model=str(path), dtype="float32")
    assert {m.compute_dtype for m in _linears(llm).values()} == {torch.bfloat16}


def test_unsupported_architecture_names_the_supported(checkpoints, tmp_path):
    path = _copy_with_config(
        checkpoints("llama"), tmp_path / "gpt2", architectures=["GPT2LMHeadModel"]
    )
    with pytest.raises(
        ValueError, match=r"GPT2LMHeadModel.*not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"
    ):
        LLM(model=str(path))


def test_contradictions_are_clear_errors(checkpoints, tmp_path):
    prequant = checkpoints("llama-nf4-dq")
    quant = json.loads((prequant / "config.json").read_text())["quantization_config"]
    eight_bit = _copy_with_config(
        prequant,
        tmp_path / "int8",
        quantization_config={**quant, "load_in_4bit": False, "load_in_8bit": True},
    )
    with pytest.raises(ValueError, match="8-bit"):
        LLM(model=str(eight_bit))
    gptq = _copy_with_config(
        prequant, tmp_path / "gptq", quantization_config={"quant_method": "gptq", "bits": 4}
    )
    with pytest.raises(ValueError, match="quantized with 'gptq'.*bitsandbytes"):
        LLM(model=str(gptq), quantization="bitsandbytes")
    with pytest.raises(ValueError, match="already quantized"):
        LLM(
            model=str(prequant),
            quantization="bitsandbytes",
            quantization_config={"bnb_4bit_quant_type": "fp4"},
        )
    with pytest.raises(ValueError, match="unknown bitsandbytes option"):
        LLM(
            model=str(checkpoints("llama")),
            quantization="bitsandbytes",
            quantization_config={"bits": 4},
        )
    with pytest.raises(ValueError, match="quantization"):
        LLM(model=str(checkpoints("llama")), quantization="awq")
    with pytest.raises(ValueError, match="skips only some"):
        LLM(
            model=str(checkpoints("llama")), quantization="bitsandbytes",
            quantization_config={"llm_int8_skip_modules": ["q_proj"]},
        )  # fmt: skip


def test_missing_model_and_offline_hub_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="hub cannot be reached"):
        LLM(model="meta-llama/Llama-3.1-8B-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        LLM(model=str(tmp_path / "empty"))


def test_max_model_len_and_dtype_arguments(checkpoints):
    path = str(checkpoints("llama"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(model=path, max_model_len=10_000)
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=path, dtype="int8")
    llm = LLM(model=path, dtype=torch.bfloat16, max_model_len=64, quantization="bitsandbytes")
    assert llm.llm_engine.max_model_len == 64
    out = llm.generate(
        PROMPTS[2], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False
    )[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64
    assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    "skip",
    [["model.layers.1.mlp", "lm_head"], [r"model\.layers\.\d+\.self_attn", "lm_head"]],
    ids=["prefix", "regex"],
)
def test_skip_modules_follow_transformers_rule(checkpoints, tmp_path, skip):
    """A prefix or regex in llm_int8_skip_modules (transformers matches them from the name's
    start) keeps those layers in 16 bits, pre-quantized and in flight, as transformers does; a
    bare "mlp" (neither the start nor the end of a linear layer's name) keeps none."""
    path = checkpoints("llama")
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip
    )
    reference = load_reference(path, config)
    prequant = LLM(model=str(prequantize(path, tmp_path / "skip", config)), dtype="float32")
    inflight = _inflight_as_transformers_defaults(path, skip)
    for llm in (prequant, inflight):
        kinds = {n: type(m.quant_method).__name__ for n, m in _linears(llm).items()}
        kept_part = "layers.1.mlp" if skip[0].startswith("model.layers.1") else "attn"
        for name, kind in kinds.items():
            kept = kept_part in name
            assert kind == ("UnquantizedLinearMethod" if kept else "BitsAndBytesLinearMethod"), name
        for out in llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False):
            assert out.outputs[0].token_ids == greedy(reference, out.prompt_token_ids, 8)
    bare = LLM(
        model=str(path), dtype="float32", quantization="bitsandbytes",
        quantization_config={"llm_int8_skip_modules": ["mlp"]},
    )  # fmt: skip
    assert all(
        type(m.quant_method).__name__ == "BitsAndBytesLinearMethod"
        for n, m in _linears(bare).items()
        if n != "lm_head"
    )


def test_prequantized_block_size_and_storage_dtype_are_read_from_the_checkpoint(
    checkpoints, tmp_path
):
    """transformers records a weight's block size in its quant_state only (config.json has no
    key for it), and may store the packed bytes as another dtype (bnb_4bit_quant_storage):
    both load, and agree with transformers reading the same files."""
    from engine.quantize import quantize_checkpoint

    path = checkpoints("llama")
    block128 = quantize_checkpoint(path, tmp_path / "b128", compute_dtype="float32", blocksize=128)
    bf16_storage = prequantize(
        path, tmp_path / "bf16-storage",
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4",
            bnb_4bit_quant_storage=torch.bfloat16,
        ),
    )  # fmt: skip
    for checkpoint, blocksize in ((block128, 128), (bf16_storage, 64)):
        llm = LLM(model=str(checkpoint), dtype="float32")
        layer = _linears(llm)["model.layers.0.mlp.down_proj"]
        assert layer.quant_state.blocksize == blocksize
        reference = load_reference(checkpoint)
        for out in llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False):
            assert out.outputs[0].token_ids == greedy(reference, out.prompt_token_ids, 8)


def test_qwen2_slides_only_on_the_layers_its_config_names(tmp_path):
    """Qwen2 with sliding windows on (layers from max_window_layers on slide, as transformers'
    layer_types say; earlier ones attend to everything): the same tokens as transformers over
    prompts four times the window. The rotary tables are built once for all layers."""
    from checkpoints import build_model

    path = build_model(
        tmp_path / "qwen2-sliding", family="qwen2", use_sliding_window=True, sliding_window=8,
        max_window_layers=1,
    )  # fmt: skip
    reference = load_reference(path)
    assert reference.config.layer_types == ["full_attention", "sliding_attention"]
    llm = LLM(model=str(path), dtype="float32")
    windows = [
        layer.self_attn.attn.sliding_window for layer in llm.llm_engine.runner.model.model.layers
    ]
    assert windows == [None, 8]
    prompt = " ".join(PROMPTS[:3])  # well past the 8-token window
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) > 32
    assert out.outputs[0].token_ids == greedy(reference, out.prompt_token_ids, 8)
    rotaries = {
        id(layer.self_attn.rotary_emb) for layer in llm.llm_engine.runner.model.model.layers
    }
    assert len(rotaries) == 1


@pytest.mark.parametrize(
    "pattern",
    ["model.layers.1", "model.layers.1.mlp", r"model\.layers\.\d+\.self_attn", "mlp", "down_proj",
     "model.layers.0.mlp.gate", "lm_head", "layers.1.mlp"],
)  # fmt: skip
def test_skip_rule_is_transformers_own(pattern):
    """skipped_by against the installed transformers' should_convert_module (the oracle), over
    every linear layer name of a 12-layer Llama."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from engine.layers.quant.bitsandbytes import skipped_by

    names = [
        f"model.layers.{i}.{part}"
        for i in range(12)
        for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    ] + ["lm_head"]
    for name in names:
        assert skipped_by(name, [pattern]) == (not should_convert_module(name, [pattern])), name


def test_quantized_copy_with_a_skip_list_loads_in_transformers_and_here(checkpoints, tmp_path):
    """engine.quantize names lm_head (which it never quantizes) in the skip list it writes:
    transformers quantizes every linear layer the list does not name."""
    from engine.quantize import quantize_checkpoint

    copy = quantize_checkpoint(
        checkpoints("llama"), tmp_path / "q", compute_dtype="float32",
        skip_modules=["model.layers.1.mlp"],
    )  # fmt: skip
    config = json.loads((copy / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == ["model.layers.1.mlp", "lm_head"]
    reference = load_reference(copy)
    llm = LLM(model=str(copy), dtype="float32")
    for out in llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False):
        assert out.outputs[0].token_ids == greedy(reference, out.prompt_token_ids, 8)


def test_16bit_storage_of_a_16bit_model_keeps_its_16bit_tensors(checkpoints, tmp_path):
    """With the packed bytes stored as bfloat16 in a bfloat16 model, only the tensors that have
    a quant_state are packed bytes; norms and embeddings are the model's own."""
    from checkpoints import build_model
    from transformers import AutoModelForCausalLM

    source = build_model(tmp_path / "bf16", dtype=torch.bfloat16)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quant, dtype=torch.bfloat16
    )
    model.save_pretrained(tmp_path / "q")
    for f in source.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, tmp_path / "q" / f.name)
    llm = LLM(model=str(tmp_path / "q"), dtype="bfloat16")
    stored = load_file(next((tmp_path / "q").glob("*.safetensors")))
    norm = llm.llm_engine.runner.model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm.cpu(), stored["model.layers.0.input_layernorm.weight"])
    assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
