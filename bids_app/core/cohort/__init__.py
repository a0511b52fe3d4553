"""bids_app.core.cohort."""
