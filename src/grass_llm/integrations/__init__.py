"""Integrations with training frameworks. Each submodule imports its framework lazily.

* ``grass_llm.integrations.hf``: Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``, which takes the
  same ``optimizers=(optimizer, scheduler)`` argument): an optimizer/scheduler factory and a
  ``TrainerCallback`` that logs the GRASS state.
"""

__all__: list[str] = []
