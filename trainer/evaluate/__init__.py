"""``fewstep eval``: sample the mini benches with teachers and students, judge, report.

- :mod:`trainer.evaluate.config`: ``EvalConfig`` (``configs/eval/*.yaml``)
- :mod:`trainer.evaluate.sampling`: case inputs, seeded noise, counted network calls, grids
- :mod:`trainer.evaluate.judging`: bench judge by name, one case at a time
- :mod:`trainer.evaluate.run`: ``run_eval(config, output, ...)`` (Ray Data actor pool)
- :mod:`trainer.evaluate.report`: per-case JSON, per-category tables, grids, ``report.json``
"""
