"""Diagnosis rules over a trace (pure numpy): ``seqscope.diagnose(trace)``."""

from seqscope.diagnose.rules import Finding, diagnose, render_text

__all__ = ["Finding", "diagnose", "render_text"]
