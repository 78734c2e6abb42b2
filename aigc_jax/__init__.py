"""aigc_jax: protect, purify and unlearn generative data, in JAX."""

__version__ = "0.1.0"
