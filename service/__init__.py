"""shieldserve: an image classifier served behind runtime adversarial defenses."""

__version__ = "0.7.0"
