"""neuronetz-gateway: a secure, multi-tenant API gateway in front of Ollama servers."""

__version__ = "0.1.0"
