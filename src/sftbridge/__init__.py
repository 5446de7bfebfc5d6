"""sftbridge: LoRA/QLoRA supervised fine-tuning of chat LLMs, locally or on SageMaker."""

__version__ = "0.1.0"
