"""The HTTP service: FastAPI app, routes, admin, catalogue, events and server runner (torch-free); answers
come from the serving core (app.serving)."""
