"""Bridges between meshjobs and other job systems (Celery)."""
