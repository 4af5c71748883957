"""Training recipes: one module per artifact family (classifier, and one per defense).

The networks they train (the defenses' autoencoders, generators, denoisers, ...) are defined
and registered in models/architectures.py, so loading a bundle never imports a recipe; the
recipe modules re-export them under their old names (models.recipes.magnet.MagnetAutoencoder, ...).
"""
