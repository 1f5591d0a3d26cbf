"""ham-hf: a HAM10000 skin-lesion classifier built the Hugging Face way."""

__version__ = "0.1.0"
