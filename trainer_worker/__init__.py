"""Trainer workers: fine-tuning jobs (DeepSpeed + PEFT LoRA) scheduled by the control plane."""
