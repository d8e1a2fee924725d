"""The math of each method as pure tensor functions (one module per method, named after it):
passes and run-time modules call them; tests check them on hand-made tensors. Nothing here
imports passes, the runner or transformers."""
