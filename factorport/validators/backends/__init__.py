"""Runtimes behind one interface: load an artifact, return logits for a window."""
