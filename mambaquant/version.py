"""The package version, as pyproject.toml gives it; its own module so that any module can name it."""

__version__ = "0.1.0"
