"""prunellm: structured pruning, recovery and honest evaluation of Hugging Face causal LMs."""

__version__ = "0.1.0"
