"""One module per chapter: the computations behind its figures, so notebooks stay thin."""
