"""Trace files: schema, writer and reader (h5py and numpy only, no torch)."""
