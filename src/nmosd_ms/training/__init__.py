"""Training: augmentation, the one-fold loop, the cross-validation planner, executors, run store."""
