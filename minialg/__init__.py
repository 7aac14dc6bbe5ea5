"""minialg: a small, diffusers-free image-to-video sampler with Adaptive Low-pass Guidance."""
