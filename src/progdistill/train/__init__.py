"""Training: the one optimisation loop, teacher training, distillation rounds, guided stage 1."""
