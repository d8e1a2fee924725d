"""The one training loop behind every method that trains (``squeeze recover``, dReLU recovery,
the LayerSkip recipe).

- :mod:`.loop`: :func:`~.loop.train` (optimizer, schedule, gradient clipping, zero-mask
  preservation, progress callback, checkpoints) and :func:`~.loop.lr_at`;
- :mod:`.batches`: seeded batch order (the batch of step ``s`` depends on seed and ``s`` only)
  and padding;
- :mod:`.losses`: the distillation losses as pure tensor functions (KL, relative / layer-wise
  MSE, pooled cosine);
- :mod:`.distill`: :class:`~.distill.Distiller`, a teacher/student pair scored by those losses;
- :mod:`.state`: resume state as safetensors + JSON, written atomically and fingerprinted.
"""
