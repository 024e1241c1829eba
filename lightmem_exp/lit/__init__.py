"""LightningModules (training steps and metrics) and shared callbacks."""
