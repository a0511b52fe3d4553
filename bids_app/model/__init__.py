"""bids_app.model."""
