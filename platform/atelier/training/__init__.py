"""Training: the one training-config model, shared by the YAML file, the CLI and the job."""
