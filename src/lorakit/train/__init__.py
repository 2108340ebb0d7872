"""The training loop and what it needs: loss, optimiser, schedule, metrics."""
