"""Files llmprune reads and writes: calibration text, checkpoint resolution, safetensors shards,
the compact format, llmprune.json, output directories, the Hub."""
