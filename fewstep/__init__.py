"""fewstep: a data engine and trainer services for few-step distillation of diffusion models."""

__version__ = "0.1.0"
