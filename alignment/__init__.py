"""Preference alignment for text-to-image diffusion models.

The library behind the ZenML project. Pure Python + torch/diffusers: nothing in
this package imports zenml, so every part can be used and tested on its own.
"""

__version__ = "0.1.0"
