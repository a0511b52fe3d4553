"""Preloaded by the forkserver of Nipype's MultiProc workers: sets up their logging from the
environment before Nipype is imported there (see :mod:`bids_app.runlog`)."""

from .runlog import configure_worker_from_environment

configure_worker_from_environment()
