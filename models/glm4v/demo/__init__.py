"""The embedded default model: a tiny GLM-4.5V-architecture checkpoint trained on synthetic scenes."""
