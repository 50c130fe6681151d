"""The parts ``grass_llm.optim.GrassOptimizer`` coordinates, one job each (docs/architecture.md):

``units``         the param groups: one unit per decoder layer (+ embeddings / norm / head), and the
                  parameter -> unit / layer / norm-slot indices everything else uses
``precision``     how an update reaches a bf16/fp16 weight (fp32 masters, Kahan, stochastic, nearest)
``adamw``         the update itself: PyTorch's functional AdamW over pieces of parameters
``state_store``   where each unit's AdamW state lives (on the device, or offloaded: streamed per step or
                  kept per period) and the update loop over a unit's pieces
``probe``         what the gradient-ready hooks read: squared norms, micro-batches, the loss scale
``selection``     the MGN, the sampler and the probing / period schedule: which layers train
``in_backward``   updating each unit from its hooks during backward (``step_in_backward``)
``model_binding`` the optimizer's hold on the model: requires_grad, hooks, device moves, DDP / HF guards
``serialization`` ``state_dict`` / ``load_state_dict`` (everything validated before anything changes)

Private: the public API is ``GrassOptimizer`` and ``GrassConfig``.
"""
