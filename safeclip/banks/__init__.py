"""Banks of known media (placeholder: the store's package replaces this file)."""
