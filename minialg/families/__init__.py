"""One adapter per model family: what its checkpoint folder holds, how the condition is built, how the denoiser
is called and how latents are decoded. The loop itself is in minialg/pipeline.py."""
