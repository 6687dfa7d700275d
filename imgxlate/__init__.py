"""imgxlate: image-to-image models at cluster scale."""
__version__ = "0.1.0"
