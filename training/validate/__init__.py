"""``dicom-node validate``: the method's evaluation of one or two models on a site's own cases, as a report a
physicist can sign (``../shared/spec/ild-method.md``, "Metrics"; ``docs/validation.md``).

* :mod:`training.validate.predictions`: per-case probability maps cached on disk (a rerun does no inference).
* :mod:`training.validate.evaluate`: per-patient metrics, summaries, lesion sensitivity by size, FROC, ROC bands.
* :mod:`training.validate.compare`: two models per patient (Wilcoxon rank-sum and signed-rank tests).
* :mod:`training.validate.run`: which cases and role combinations each model is run on; the whole validation.
* :mod:`training.validate.tables` / :mod:`training.validate.figures`: the report's tables and plots.
* :mod:`training.validate.content`: what the report shows, in order (both renderings draw it).
* :mod:`training.validate.report` / :mod:`training.validate.pdf`: ``report.html``, ``report.pdf``,
  ``metrics.json`` and ``cases.csv``.
"""
