"""`lorakit dashboard`: one local web page that shows the runs in a folder, their curves, settings and samples,
and compares adapters on the same held-out prompts. Read-only; reads nothing outside the runs folder."""
