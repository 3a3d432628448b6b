"""vit_jax: Vision Transformers in JAX/Flax."""

__version__ = "0.1.0"
