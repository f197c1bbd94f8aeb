"""The serving core below HTTP: checkpoints made ready to serve, the recommender, and the model holder.

Imports ``app.db`` and the trainer's torch-free modules (the checkpoint reader); never FastAPI or
``app.api``. Its callers are the HTTP layer (``app.api``) and the CLI (``recsys recommend``).
"""
