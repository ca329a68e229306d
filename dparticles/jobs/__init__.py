"""The jobs: Import Particle Stack, Restack, Downsample, and info. Each is one function of the public API."""
