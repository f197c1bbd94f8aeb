"""Database layer: SQLAlchemy models, engine, migrations and bulk event I/O. Imports nothing from FastAPI."""
