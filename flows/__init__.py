"""Prefect orchestration over the DVC stages (may import prefect and dvc; tasks/ never does).

- retrain.py      the `retrain` flow: data version -> each dvc.yaml stage -> push -> gate and publish
- watch.py        the `watch` flow: retrain when data/raw.dvc changes on the data branch
- serve.py        `make serve`: a real local server, both deployments on their schedules (no work pool)
- demo.py         `make demo`: demo data, the retrain flow, one JSON summary line
- dvc_runner.py   subprocesses streamed line by line into the run log, timeouts, stage outcomes
- data_version.py git revisions -> DVC data hashes; isolated git worktrees sharing the DVC cache
- lock.py         one retrain at a time per project (fcntl lock in .dvc/tmp)
- server.py       the project's local Prefect server: reuse the running one or start one per command
- processes.py    children that die with their parent (process groups, parent-death signal, a guard)
"""
