"""Trains nibble's embedded demo model: a small Llama (GQA, tied embeddings) with its own
byte-level BPE tokenizer, on the corpus that corpus.py builds. Writes the Hugging Face layout
(config.json, model.safetensors in bf16, tokenizer, chat template, generation_config.json) and
training.json (corpus, seed, hyper-parameters, losses).

    python benchmarks/demo_model/train.py --corpus .corpus --out benchmarks/demo_model/model
    python benchmarks/demo_model/train.py --corpus .corpus --out /tmp/m --steps 5 --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DOC_SEPARATOR = "\n\n\n"  # corpus.py joins documents with it
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
OPTIMIZER = "AdamW(betas 0.9, 0.95), warm-up then cosine decay to 10%, clip 1.0, bf16 autocast"
SPECIAL = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
EVAL_EVERY = 100
HYPER = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    seq_len=256, batch_size=128, lr=3e-3, warmup=100, weight_decay=0.1, seed=0,
)  # fmt: skip


def train_tokenizer(text: str, vocab_size: int, out: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(text.split("\n\n"), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def encode(tokenizer, text: str) -> torch.Tensor:
    """Documents joined by </s>, as one stream of token ids."""
    ids: list[int] = []
    for doc in text.split(DOC_SEPARATOR):
        ids += tokenizer.encode(doc) + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, device) -> float:
    model.eval()
    n = (len(data) - 1) // seq_len
    x = data[: n * seq_len].view(n, seq_len)
    y = data[1 : n * seq_len + 1].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, 64):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[i : i + 64].to(device)).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y[i : i + 64].to(device).flatten(), reduction="sum"
        )
        total, count = total + loss.item(), count + y[i : i + 64].numel()
    model.train()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    h = HYPER
    torch.manual_seed(h["seed"])
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    train_text = (args.corpus / "train.txt").read_text()
    valid_text = (args.corpus / "valid.txt").read_text()
    tokenizer = train_tokenizer(train_text, h["vocab_size"], args.out)
    train_ids, valid_ids = encode(tokenizer, train_text), encode(tokenizer, valid_text)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=h["hidden_size"],
        intermediate_size=h["intermediate_size"], num_hidden_layers=h["num_hidden_layers"],
        num_attention_heads=h["num_attention_heads"], num_key_value_heads=h["num_key_value_heads"],
        max_position_embeddings=h["max_position_embeddings"], tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": h["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=h["lr"], betas=(0.9, 0.95), fused=device.type == "cuda",
    )  # fmt: skip

    def lr_at(step: int) -> float:
        if step < h["warmup"]:
            return h["lr"] * (step + 1) / h["warmup"]
        progress = (step - h["warmup"]) / max(1, args.steps - h["warmup"])
        return h["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    generator = torch.Generator().manual_seed(h["seed"])
    seq, losses, start = h["seq_len"], [], time.time()
    # Early stopping: the corpus is small (a few million tokens), so keep the weights with the
    # best held-out perplexity rather than the last ones.
    best_ppl, best_step, best_state = float("inf"), -1, None
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - seq - 1, (h["batch_size"],), generator=generator)
        x = torch.stack([train_ids[s : s + seq] for s in starts]).to(device)
        y = torch.stack([train_ids[s + 1 : s + seq + 1] for s in starts]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % EVAL_EVERY == 0 or step == args.steps - 1:
            ppl = evaluate(model, valid_ids, seq, device)
            losses.append((step, round(loss.item(), 4), round(ppl, 2)))
            print(
                f"step {step} loss {loss.item():.3f} valid ppl {ppl:.2f}",
                f"({time.time() - start:.0f} s)",
                flush=True,
            )
            if ppl < best_ppl:
                best_ppl, best_step = ppl, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    valid_ppl = best_ppl
    print(f"kept step {best_step}: held-out perplexity {valid_ppl:.2f}")
    model = model.to(torch.bfloat16).cpu()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(args.out)
    corpus = json.loads((args.corpus / "corpus.json").read_text())
    record = {
        "corpus": {k: v for k, v in corpus.items() if k != "valid_files"},
        "hyper_parameters": h | {"steps": args.steps, "optimizer": OPTIMIZER},
        "train_tokens": len(train_ids), "valid_tokens": len(valid_ids),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "losses (step, train loss, valid ppl)": losses, "kept_step": best_step,
        "valid_perplexity": valid_ppl, "train_seconds": time.time() - start,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }  # fmt: skip
    (args.out / "training.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
