"""Examples of bringing your own model to shieldserve (see the README's "Bring your own model")."""
