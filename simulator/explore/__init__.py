"""Design-space exploration: evaluate many configs of one model (sweeps, mixed-precision
search), in parallel on Dask, and draw what a person would rather look at than read."""
