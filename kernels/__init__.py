"""squeeze.kernels: sparse kernels (Triton, torch references, CPU fast paths). Never imports the passes."""
