"""Layer 1 of the analysis: pure maths. Tensors in, float64 tensors, floats or frozen dataclasses out.

- :mod:`~lora_analysis.metrics.linalg`: factored SVD of s·B·A, W's SVD cache, orthonormal bases.
- :mod:`~lora_analysis.metrics.subspace`: φ grids, principal angles, random baselines (Section 7.2).
- :mod:`~lora_analysis.metrics.projection`: Table 7's projections, amplification and their random nulls (7.3).
- :mod:`~lora_analysis.metrics.spectra`: effective ranks and intruder dimensions.

No file I/O, no plotting, no model objects. Imports nothing from the project above it (only torch and the
other modules of this folder).
"""
