"""The machinery behind etl.py, one module per concern (docs/DESIGN.md has the map)."""

__version__ = "2.0.0"
