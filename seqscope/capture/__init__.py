"""Capture: torch hooks that record recurrent layers during training."""
