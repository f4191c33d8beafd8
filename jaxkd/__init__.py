"""jaxkd: knowledge distillation in JAX/Flax."""

from jaxkd import _xla_defaults

_xla_defaults.apply()  # must run before jax creates its CPU backend
