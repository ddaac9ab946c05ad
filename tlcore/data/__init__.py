"""Dataset layouts, splits, loading and patch sampling."""
