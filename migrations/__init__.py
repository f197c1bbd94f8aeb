"""Alembic migrations for the recsys schema (run with `recsys db upgrade`)."""
