"""Generation and classification with a base model and its adapters."""
