"""2:4 sparse kernels (Triton / CUDA) for llmprune. Installed as `llmprune_kernels`, never as `kernels`."""
