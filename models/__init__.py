"""Architectures, datasets, the bundle format and the training recipes of shieldserve."""
