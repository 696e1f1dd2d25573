"""ood-sweep orchestrator: CLI, config schema, planning, Tune search, MLflow tracking, reports."""
