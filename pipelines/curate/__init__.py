"""The curate stage: read raw corpora, filter, caption, tag, rebalance, publish (Ray Data).

Python API: ``from pipelines.curate import run_curate`` (see :func:`pipelines.curate.run.run_curate`).
"""


def __getattr__(name: str):
    # Lazy, so that ``fewstep --help`` does not import the stage.
    if name == "run_curate":
        from pipelines.curate.run import run_curate

        return run_curate
    raise AttributeError(name)
