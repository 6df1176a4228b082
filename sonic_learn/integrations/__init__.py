"""Run other libraries' models through sonic_learn layers (``hf``: Hugging Face transformers)."""
