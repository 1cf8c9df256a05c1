"""The multi-user machinery: multi-slot layers, fused kernels, the trainer and its continuous batching,
generation, encoding; the Ray model workers, Ray set-up, and DeepSpeed anchor training."""
