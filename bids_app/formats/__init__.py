"""bids_app.formats."""
