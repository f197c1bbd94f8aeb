"""recsys: a recommendation microservice whose edge is negative sampling."""

__version__ = "0.1.0"
