"""The label value that carries no loss, shared by every tokeniser of the data layer."""

IGNORE_INDEX = -100
"""Label value ``torch.nn.CrossEntropyLoss`` skips: prompt, history and padding positions."""
