"""effml: reference PyTorch implementations of efficient deep-learning methods, each with a recipe that tests its
paper's claim side by side with its baseline. See README.md for the method table and the architecture."""

__version__ = "0.1.0"
