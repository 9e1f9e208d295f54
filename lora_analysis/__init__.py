"""Exact, pure metrics for the structure of LoRA updates (Hu et al., 2021, Section 7 and Appendix H)."""
