"""Task-specific data set generators and scorers (one module per task, e.g. ``ros2``)."""
