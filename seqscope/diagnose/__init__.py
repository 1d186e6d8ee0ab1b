"""Diagnosis rules over a trace (pure numpy)."""
