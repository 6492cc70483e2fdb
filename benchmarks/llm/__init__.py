"""The LLM's speed and recipe: ranking and LoRA training throughput (`ranking`, `training`, part
of `make bench`), fp32 against bf16 (`dtype`, `make bench-dtype`), LoRA in the top layers
(`lora_layers`, `make bench-lora-layers`) and a probe of the frozen model (`frozen_probe`)."""
