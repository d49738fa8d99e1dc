"""CPET: parameter-efficient tuning of compressed language models."""

__version__ = "0.1.0"
