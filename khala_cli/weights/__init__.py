"""Model directories: find, build (demo), convert (Megatron/Lightning download), check."""
