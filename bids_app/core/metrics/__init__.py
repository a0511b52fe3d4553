"""bids_app.core.metrics."""
