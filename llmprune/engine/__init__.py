"""The calibration engine: layerwise and lockstep calibration, streaming from safetensors
shards, working directories and resume, the memory plan, device maps, data-parallel
calibration and per-layer sparsity allocation (OWL)."""
