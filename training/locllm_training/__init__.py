"""LocLLM in PyTorch: the model, our checkpoint format, training and data tools."""
