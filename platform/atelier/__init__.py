"""Atelier: DreamBooth fine-tuning and Stable Diffusion serving on Ray, with models in S3."""

__version__ = "0.1.0"
