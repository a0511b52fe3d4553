"""Preloaded by the forkserver of Nipype's MultiProc workers: sets up their logging from the
environment before Nipype is imported there (see :mod:`bids_app.app.runlog`)."""

from bids_app.app.runlog import configure_worker_from_environment

configure_worker_from_environment()
