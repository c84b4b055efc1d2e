"""Evaluation protocols over any pretrained method."""
