"""mlcid package."""
