"""MLflow: runs and their logging, the model registry, the pyfunc model, and resolving `--model`."""
