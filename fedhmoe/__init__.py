"""fedhmoe: personalized federated fine-tuning of LLMs with heterogeneous mixtures of experts, on Flower."""

__version__ = "0.1.0"
