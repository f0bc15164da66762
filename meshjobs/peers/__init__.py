"""Kinds of peer beyond plain system workers: sandboxed, AI persona, human, hybrid."""
