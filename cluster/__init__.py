"""raylm cluster layer: recipes (typed configs), Ray runtime start-up, run directories, jobs, the CLI.

Nothing here imports from pipelines/, actors/ or serve/ at module level; only the CLI reaches up, lazily,
inside each command.
"""
