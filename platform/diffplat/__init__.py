"""diffplat: synthetic images from diffusion adapters at cluster scale."""

__version__ = "0.1.0"
