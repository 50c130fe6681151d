"""Workflows on top of the library: ``grass-llm train`` and what it needs.

* ``methods``: the registry of fine-tuning methods (grass, grass-static, lisa, badam, fft, lora, dora);
* ``train_config``: ``TrainConfig`` (YAML + ``key=value``), holding a ``GrassConfig``, on
  ``config_values`` (parsing, coercion, range checks);
* ``finetune``: ``train()`` and the ``FinetuneRecipe`` that coordinates ``inputs`` (checks before
  loading), ``resume`` (which checkpoint, which changes), ``build`` (``TrainObjects``), ``step`` (one
  optimizer step), ``state`` (``Progress``, the checkpointer), ``final`` (the final model),
  ``reporting`` (output and run log) and ``heldout`` (the demo's accuracy); ``errors``: its exit codes
  and errors; ``train_cli``: its command line (which also draws the plots);
* ``run_checkpoint``: atomic, resumable run checkpoints;
* ``launch``: process-group setup under torchrun / accelerate;
* ``interrupt``: SIGINT / SIGTERM deferred to the end of the training step.

(``models`` and ``runlog`` moved below the applications, to ``grass_llm.models`` and
``grass_llm.runlog``; the old names still import.)

The library (``grass_llm.optim`` and below) never imports this package (tests/test_layering.py).
"""
