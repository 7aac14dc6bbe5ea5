"""One adapter per model family: what its checkpoint folder holds, how the condition is built, how the denoiser
is called and how latents are decoded. The loop itself is in minialg/pipeline.py; a new family is listed in
minialg/registry.py (FAMILIES), the only place outside its own files that knows it."""
