"""The HTTP edge: routers, pydantic models, error handling."""
