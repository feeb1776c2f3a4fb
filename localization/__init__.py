"""Localization: where in the denoiser is a memorized image or a concept stored (one module per method)."""
