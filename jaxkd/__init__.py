"""jaxkd: knowledge distillation in JAX/Flax.

The public API is what this module lists in ``__all__`` and the public modules below; anything
else (names starting with ``_``, ``jaxkd.train.loop``'s helpers, ``jaxkd.data.builders``) may change
without notice.

Public modules (import them by name; ``import jaxkd`` itself imports no JAX):

* :mod:`jaxkd.losses` -- pure per-example losses (``hinton_kd``, ``fitnets_hint``,
  ``attention_transfer``, ``dkd``, ``crd_nce_loss``, ...), usable in any training loop;
* :mod:`jaxkd.models` -- ``create_model``, ``register_model``, ``from_linen``, ``from_nnx``: models
  as pure functions ``apply(variables, x, train) -> (logits, features, new_state)``, where
  ``features`` are the named feature taps;
* :mod:`jaxkd.methods` / :mod:`jaxkd.core` -- recipes (``Recipe``, ``register_recipe``,
  ``build_recipe``) that say what a method computes;
* :mod:`jaxkd.train` -- ``make_train_step``, ``create_train_state``, ``make_eval_step``, ``make_mesh``,
  ``train_and_evaluate`` (the runner);
* :mod:`jaxkd.config` -- ``base_config``, ``load_config``, ``apply_overrides``;
* :mod:`jaxkd.experiment` -- ``compare`` (teacher, baseline and distilled students, one table).

Importing jaxkd changes no global state (no ``XLA_FLAGS``, no JAX config). jaxkd's runner
(``jaxkd`` on the command line, ``jaxkd.train.train_and_evaluate``) applies its XLA:CPU defaults
itself; in your own loop call :func:`apply_cpu_defaults` before the first JAX computation to get
them (2.1-2.5x faster convolutions on CPU with jaxlib 0.10; see ``jaxkd/_xla_defaults.py``).
"""

from __future__ import annotations

__all__ = ["__version__", "apply_cpu_defaults"]

__version__ = "0.1.0"


def apply_cpu_defaults() -> bool:
    """Opt in to jaxkd's XLA:CPU defaults in your own program; returns whether a flag was added.

    Adds XLA's own convolutions instead of YNNPACK's (``--xla_cpu_experimental_ynn_fusion_type``)
    to ``XLA_FLAGS``, for the jaxlib versions where that was measured. Call it before the first
    JAX computation (XLA reads ``XLA_FLAGS`` once, when it creates the backend); afterwards it
    warns and changes nothing. A value of the option already in ``XLA_FLAGS`` wins;
    ``JAXKD_NO_XLA_DEFAULTS=1`` turns it off. Only the CPU backend is affected.
    """
    from jaxkd import _xla_defaults

    if _xla_defaults.backends_initialized() and not _xla_defaults.os.environ.get("JAXKD_NO_XLA_DEFAULTS"):
        import warnings

        warnings.warn("jaxkd.apply_cpu_defaults() called after JAX created its backends: XLA_FLAGS is read "
                      "only once; call it before the first JAX computation", RuntimeWarning, stacklevel=2)
        return False
    return _xla_defaults.apply()
