"""The core: typed errors, the sparsity specification, mask selection and packed bits. It imports
nothing else of llmprune."""
