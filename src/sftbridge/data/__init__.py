"""Datasets in, validated records out (``loading``), rendered through the prompt and chat template exactly as
training and inference see them (``formatting``)."""
