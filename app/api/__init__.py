"""The HTTP service: FastAPI app, routes, model holder and server runner (torch-free)."""
