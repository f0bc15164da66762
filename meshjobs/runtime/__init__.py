"""Offering work: the App a worker serves, the shared executor, the live worker and the durable runner."""
