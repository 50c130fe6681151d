"""Workflows on top of the library: ``grass-llm train`` and what it needs.

* ``methods``: the registry of fine-tuning methods (grass, grass-static, lisa, badam, fft, lora, dora);
* ``train_config``: ``TrainConfig`` (YAML + ``key=value``), holding a ``GrassConfig``;
* ``finetune``: the recipe (setup / train_step / log / save); ``train_cli``: its command line;
* ``run_checkpoint``: atomic, resumable run checkpoints;
* ``launch``: process-group setup under torchrun / accelerate;
* ``interrupt``: SIGINT / SIGTERM deferred to the end of the training step.

(``models`` and ``runlog`` moved below the applications, to ``grass_llm.models`` and
``grass_llm.runlog``; the old names still import.)

The library (``grass_llm.optim`` and below) never imports this package.
"""
