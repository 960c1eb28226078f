"""The pytest harness: gate CI on a distilled student's format rate, quality, speed and size.

Layered like pytest-benchmark's plugin:

- ``plugin``   the pytest side: options, markers, fixtures, parametrization, session hooks
  (the ``pytest11`` entry point; imports nothing heavy, so it is inert in unrelated runs);
- ``session``  ``DistillerSession``, what one pytest session measured: specs, models under test,
  evaluations, single-stream latency, other figures, and the report it produced;
- ``gates``    threshold and baseline-regression checks, with failure messages that say what,
  where, against what, by which test, and show failing samples.

Eval modules import checks from ``distiller.harness.gates`` and the ``models`` decorator from
``distiller.harness.plugin``; everything else reaches them through fixtures.
"""
