"""Training on the CPU: the shipped digits backbones (distillation and fine-tuning build on this)."""
