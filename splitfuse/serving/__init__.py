"""The persistent deployment: an OpenAI-compatible HTTP server over an AsyncEngine."""
