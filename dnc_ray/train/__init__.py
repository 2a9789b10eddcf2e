"""Supervised fine-tuning of students on Ray Train + DeepSpeed: data.py (rows -> tokens), recipe.py (the run).

Light on purpose: the CLI imports TrainSetError from here without loading torch.
"""


class TrainSetError(ValueError):
    """A training set that cannot be used; the message names the file and the problem."""
