"""hyperbagel: Hyper-Bagel acceleration of BAGEL-style unified multimodal models."""

__version__ = "0.1.0"
