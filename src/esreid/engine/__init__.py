"""Training and evaluation: the Trainer, feature extraction, protocols and the schedule."""
