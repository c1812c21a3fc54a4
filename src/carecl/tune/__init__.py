"""carecl tune: hyperparameters chosen on a validation split with Optuna (study.py), never the test set."""
