"""Run-time modules: what inference code runs and what ``squeeze.load`` installs.

- ``sparse24``: 2:4 compressed linears; ``act_sparse`` (TEAL / WINA) and ``drelu``: activation-sparse MLPs.
- ``plan``: at load time, which of a run-time's sparse and dense paths is faster on this machine
  for the model's shapes (measured once, cached per machine).
- ``stack``: the one decoder-stack walker (embeddings, rotary, causal masks, layer calls, final
  norm) and the shared exit head; ``early_exit`` and ``speculative`` (``squeeze.generate``) run on it.
- ``token_drop``: the LLaVA forward that lets image tokens leave the sequence (on the same walker),
  with its policies ``pyramiddrop`` and ``mustdrop``.

Nothing here imports the compress side (passes, calibration, training, the compressor).
"""
