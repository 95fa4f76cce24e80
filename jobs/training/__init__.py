"""Training on Ray Train: the TorchTrainer of a run, what each worker runs, and the end of a run."""
