"""The recipe: its typed schema, loading it from YAML with overrides, and the README's reference table."""
