"""Model building: loading a local Hugging Face model with paged attention, and the built-in presets."""
