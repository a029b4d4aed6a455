"""khala: batch renderer for offline song catalogues with the Khala full-song model."""

__version__ = "0.1.0"
