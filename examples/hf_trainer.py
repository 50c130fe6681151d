"""GRASS with the Hugging Face Trainer (TRL's SFTTrainer takes the same `optimizers=` and `callbacks=`).

    python examples/hf_trainer.py            # tiny random Llama + built-in arithmetic data, CPU

Two things to do:
1. build the optimizer and scheduler with `create_grass_optimizer_and_scheduler` and pass them as
   `optimizers=(optimizer, scheduler)`;
2. `add_grass_callback(trainer)` logs active layers, MGN and probabilities per layer
   (`grass/active/layer_i`, `grass/mgn/layer_i`, `grass/prob/layer_i`) to every reporter.
The Trainer's clipping (max_grad_norm), accumulation and mixed precision need no change.
Optional: `compute_loss_func=ChunkedCausalLMLoss(model)` computes the same loss without the full fp32
logits (the largest activation for a large vocabulary).
"""

import tempfile

import torch
from transformers import Trainer, TrainingArguments

from grass_llm import ChunkedCausalLMLoss, GrassConfig
from grass_llm.data import builtin_sample, builtin_tokenizer, tokenize_records
from grass_llm.integrations.hf import add_grass_callback, create_grass_optimizer_and_scheduler
from grass_llm.models import tiny_llama

torch.manual_seed(0)
tokenizer = builtin_tokenizer()
examples = tokenize_records(builtin_sample(64), tokenizer, max_length=96)  # [{"input_ids", "labels"}]


def collate(rows):
    """Right-pad a list of examples into (B, T) tensors; padded labels are -100 (no loss)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# a tiny random Llama (8 layers, hidden 64); with your own model: AutoModelForCausalLM.from_pretrained(...)
model = tiny_llama(len(tokenizer), hidden_size=64, num_layers=8, pad_token_id=tokenizer.pad_token_id)

args = TrainingArguments(
    output_dir=tempfile.mkdtemp(prefix="grass-hf-"),
    per_device_train_batch_size=8,
    learning_rate=3e-3,
    warmup_steps=5,  # counted after probing
    lr_scheduler_type="cosine",
    max_steps=80,
    max_grad_norm=1.0,  # the Trainer clips; GRASS reads each gradient's norm before that
    logging_steps=10,
    save_strategy="no",
    report_to=[],  # e.g. ["tensorboard"]: the GRASS scalars go there too
    use_cpu=True,
    remove_unused_columns=False,
)
grass = GrassConfig(active_layers=2, period=10, probe_steps=20)
optimizer, scheduler = create_grass_optimizer_and_scheduler(model, args, grass_config=grass)

trainer = Trainer(
    model=model,
    args=args,
    train_dataset=examples,
    data_collator=collate,
    optimizers=(optimizer, scheduler),
    compute_loss_func=ChunkedCausalLMLoss(model),  # same loss, no (B, T, vocab) fp32 logits
)
add_grass_callback(trainer)
trainer.train()

last = trainer.state.log_history[-2]  # the last training log (the final entry is the summary)
active = [i for i in range(optimizer.num_layers) if last.get(f"grass/active/layer_{i}")]
print(f"last logged step {last['step']}: loss {last['loss']:.3f}, active layers {active}")
