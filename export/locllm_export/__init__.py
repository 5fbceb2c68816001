"""Export a LocLLM checkpoint to a self-describing engine directory."""
