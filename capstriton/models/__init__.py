"""Capsule network models, one module per model: ``capsnet`` (Sabour, Frosst & Hinton 2017)."""

from .capsnet import CapsNet

__all__ = ["CapsNet"]
