"""Evaluation against reference masks (pure numpy, no file I/O; ``docs/uncertainty.md``).

* :mod:`~bids_app.core.metrics.detection`: lesion-wise detection (TPL / USL / FPL / FNL), F1,
  recall, precision, USL-rate, and the detection defaults (method, IoU threshold, connectivity);
* :mod:`~bids_app.core.metrics.overlap`: DSC, nDSC and voxel TPR / FPR / FDR;
* :mod:`~bids_app.core.metrics.calibration`: CE, ECE, MCE and Brier score of a probability map;
* :mod:`~bids_app.core.metrics.retention`: voxel, lesion and patient error retention curves;
* :mod:`~bids_app.core.metrics.session`: :func:`~bids_app.core.metrics.session.evaluate_session`,
  everything above for one session (the participant workflow's evaluation node);
* ``_checks``: the input checks they share.
"""
