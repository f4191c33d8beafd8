"""jaxkd: knowledge distillation in JAX/Flax."""
