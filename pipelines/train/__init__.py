"""The reusable training engine (Ray Train + DeepSpeed); see ``pipelines.train.engine``."""
