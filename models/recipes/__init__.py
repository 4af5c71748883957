"""Training recipes: one module per artifact family (classifier, and one per defense).

A recipe module that defines its own networks registers them with
`models.architectures.register_builtin` on import, so bundles can name them.
"""
