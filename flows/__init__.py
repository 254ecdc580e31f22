"""Prefect orchestration over the DVC stages (may import prefect and dvc; tasks/ never does).

docs/architecture.md says what each module is for.
"""
