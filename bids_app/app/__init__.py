"""bids_app.app."""
