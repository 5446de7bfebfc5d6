"""sftbridge: LoRA/QLoRA supervised fine-tuning of chat LLMs, locally or on SageMaker."""

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it (tool.hatch.version)
