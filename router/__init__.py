"""pdserve's router: the OpenAI-compatible HTTP front door (FastAPI + uvicorn)."""

__version__ = "0.1.0"
