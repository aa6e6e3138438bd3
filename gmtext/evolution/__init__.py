"""Private Evolution (generator=pe): embedders, the private vote, LM variations (docs/pe.md)."""
