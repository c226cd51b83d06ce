"""The OpenAI-compatible HTTP front (FastAPI on uvicorn) beside the gRPC service."""
