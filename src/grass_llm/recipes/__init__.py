"""Workflows on top of the library: ``grass-llm train`` and what it needs.

* ``methods``: the registry of fine-tuning methods (grass, grass-static, lisa, badam, fft, lora, dora);
* ``train_config``: ``TrainConfig`` (YAML + ``key=value``), holding a ``GrassConfig``;
* ``finetune``: the recipe (setup / train_step / log / save); ``train_cli``: its command line;
* ``run_checkpoint``: atomic, resumable run checkpoints;
* ``models``: the tiny Llama builder and the model/tokenizer loader;
* ``launch``: process-group setup under torchrun / accelerate;
* ``runlog``: the per-step ``log.jsonl``.

The library (``grass_llm.optim`` and below) never imports this package.
"""
