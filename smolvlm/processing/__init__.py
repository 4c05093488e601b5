"""Prompts, chat messages and images -> model inputs (`Processor`), and ids -> text."""

from .images import load_image
from .processor import Processor

__all__ = ["Processor", "load_image"]
