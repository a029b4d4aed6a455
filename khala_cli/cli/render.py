"""`khala render`, `validate`, `plan`, `tags` (implemented with manifest/plan/runner/report)."""
