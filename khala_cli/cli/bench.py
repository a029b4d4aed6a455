"""`khala bench` (implemented with the engine)."""
