"""Diagnosis rules over a trace (pure numpy): ``seqscope.diagnose(trace)``."""

from seqscope.diagnose.rules import Finding, diagnose, no_findings, render_text

__all__ = ["Finding", "diagnose", "no_findings", "render_text"]
