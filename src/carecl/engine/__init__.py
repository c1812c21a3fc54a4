"""The engine: the one training loop and everything around it (experiments, evaluation, precision,
loggers, checkpointing, whole runs). Its public names:

    from carecl.engine import run_experiment, resume_experiment, Experiment, load_experiment
"""

from carecl.engine.checkpointing import load_experiment, save_learner
from carecl.engine.experiment import Experiment
from carecl.engine.loop import TrainingError, learn_task
from carecl.engine.run import resume_experiment, run_experiment
from carecl.runs.state import RunProgress

__all__ = ["Experiment", "RunProgress", "TrainingError", "learn_task", "load_experiment", "resume_experiment",
           "run_experiment", "save_learner"]
