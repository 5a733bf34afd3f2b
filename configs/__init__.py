"""Built-in YAML configs, importable as the package ``wsss.configs``."""
