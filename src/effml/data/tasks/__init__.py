"""Synthetic tasks: deterministic generators from a seed with their own evaluation (see :mod:`.base`)."""

from effml.data.tasks.base import (TASKS, Task, TaskBatch, TokenTask, build_task, derive_seed, evaluation_batches,
                                   register_task)
from effml.data.tasks.copying import Copying
from effml.data.tasks.primitives import Arithmetic, InductionCopying, PrimitiveTask, VariableAssignment
from effml.data.tasks.recall import MQAR
from effml.data.tasks.regression import InContextRegression, RegressionBatch
from effml.data.tasks.translation import SyntheticTranslation, TranslationBatch, TranslationTask
from effml.data.tasks.verses import VerseTranslation

__all__ = ["TASKS", "Task", "TaskBatch", "TokenTask", "build_task", "register_task", "derive_seed",
           "evaluation_batches", "Copying", "MQAR", "InContextRegression", "RegressionBatch",
           "PrimitiveTask", "InductionCopying", "VariableAssignment", "Arithmetic",
           "SyntheticTranslation", "TranslationBatch", "TranslationTask", "VerseTranslation"]
