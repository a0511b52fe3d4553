"""Cohort statistics of the group level (pure pandas / numpy / scipy / scikit-learn, no file I/O;
``docs/features.md`` §3).

* :mod:`~bids_app.core.cohort.summary`: bootstrap means, CIs and SEs, session tables, domains,
  pooled detection metrics and patient-scale retention tables;
* :mod:`~bids_app.core.cohort.icc`: ICC(3,1) and ICC(3,k) with F test and confidence intervals;
* :mod:`~bids_app.core.cohort.drivers`: what drives lesion uncertainty, the regression of a
  lesion's uncertainty on its features (:func:`~bids_app.core.cohort.drivers.uncertainty_drivers`).
"""
