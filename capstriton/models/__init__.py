"""Capsule network models, one module per model: ``capsnet`` (Sabour, Frosst & Hinton 2017),
``efficient_capsnet`` (Mazzia, Salvetti & Chiaberge 2021)."""

from .capsnet import CapsNet
from .efficient_capsnet import EfficientCapsNet

__all__ = ["CapsNet", "EfficientCapsNet"]
