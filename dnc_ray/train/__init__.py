"""Supervised fine-tuning of students on Ray Train + DeepSpeed: data.py (rows -> tokens), recipe.py (the run),
trainer.py (the Trainer of a worker), callbacks.py (at each log, evaluation and save).

Light on purpose: the CLI imports TrainSetError from here without loading torch.
"""


class TrainSetError(ValueError):
    """A training set that cannot be used; the message names the file and the problem."""
