"""GRASS in a plain PyTorch loop: the whole algorithm in one readable file (nanoGPT style).

    python examples/grass_loop.py            # tiny random Llama + built-in arithmetic data, CPU, ~10 s

GrassOptimizer is a torch.optim.Optimizer: build it from the model, call backward() and step() as
usual. It decides which decoder layers train (it sets requires_grad itself), measures each layer's
mean gradient norm (MGN) and re-draws the active layers every `period` steps:

    steps 1..probe_steps        probing: forward + backward through every layer, MGN recorded, no update
    then, every `period` steps  draw `active_layers` layers with p = softmax(MGN / mean(MGN) / tau)
                                train only them (AdamW); update their MGN by EMA at the period's end
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grass_llm import GrassConfig, GrassOptimizer
from grass_llm.data import build_loader, builtin_sample, builtin_tokenizer

torch.manual_seed(0)

# -- data: Alpaca-style prompts, loss on the response tokens only ------------------------------
tokenizer = builtin_tokenizer()  # byte-level, built in memory (no download)
loader = build_loader(builtin_sample(64), tokenizer, max_length=96, batch_size=8, seed=0)

# -- model: a tiny random Llama ----------------------------------------------------------------
config = LlamaConfig(
    vocab_size=len(tokenizer),  # V
    hidden_size=64,  # C
    intermediate_size=128,
    num_hidden_layers=8,  # L decoder layers: GRASS samples among these
    num_attention_heads=4,
    num_key_value_heads=4,
    pad_token_id=tokenizer.pad_token_id,
)
model = LlamaForCausalLM(config)

# -- optimizer: AdamW over gamma sampled layers -------------------------------------------------
grass = GrassConfig(
    active_layers=2,  # gamma
    period=10,  # Ts
    probe_steps=20,  # Tp
    max_grad_norm=1.0,  # clip inside step(), after the MGN is read
)
opt = GrassOptimizer(model, grass, lr=3e-3, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # any scheduler works: one group per layer

max_steps, grad_accum = 120, 1
batches = loader.forever()  # endless, seeded, resumable (loader.state_dict())
model.train()
for step in range(1, max_steps + 1):
    for _ in range(grad_accum):
        batch = next(batches)  # input_ids, attention_mask, labels: (B, T) int64
        out = model(**batch)  # out.logits: (B, T, V); out.loss: mean over response tokens
        (out.loss / grad_accum).backward()  # gradients reach only the active layers (+ probing hooks)
    phase = "probe" if opt.probing else f"layers {opt.active_layers}"
    opt.step()  # MGN update, AdamW on the active layers, resample at the end of a period
    sched.step()
    opt.zero_grad(set_to_none=True)
    if step % 10 == 0:
        mgn = opt.importance  # (L,) float64: current MGN per layer
        p = opt.probabilities  # (L,) float64: sampling probabilities, sum to 1
        print(
            f"step {step:4d} | loss {out.loss.item():.3f} | {phase:<14} | "
            f"MGN {' '.join(f'{m:.1e}' for m in mgn.tolist())} | "
            f"p max {p.max().item():.2f} (layer {int(p.argmax())})"
        )

# opt.state_dict() holds every layer's AdamW moments, the MGN and the sampler's RNG: it resumes exactly
print(f"done: {len(opt.state)} parameters have AdamW moments (the layers trained at least once)")
