"""Distillation of BAGEL's image generation: shared generation weights, batches, and the stages' math."""
