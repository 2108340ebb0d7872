"""An OpenAI-compatible HTTP server for one base model and many LoRA adapters (`lorakit serve`)."""
