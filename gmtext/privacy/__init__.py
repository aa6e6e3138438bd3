"""Differential-privacy accounting for the noisy gradient releases of GRADMM."""
