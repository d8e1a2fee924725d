"""Run-time modules applied by ``squeeze.load`` (activation sparsity, ...)."""
