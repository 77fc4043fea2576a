"""jdd: dataset distillation for frozen pre-trained vision encoders (JAX/Flax)."""

__version__ = "0.1.0"
