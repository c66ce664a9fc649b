"""kdrl: on-policy knowledge distillation of language models, alone and joined with GRPO."""

__version__ = "0.1.0"
