"""tunelab: fine-tune large language models on your own data, from data files to a shipped model."""

__version__ = "0.1.0"
