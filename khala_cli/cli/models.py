"""`khala convert` and `khala doctor` (implemented with the weights layer)."""
