"""jdistill: knowledge distillation for object detectors in JAX and Flax."""

__version__ = "0.1.0"
